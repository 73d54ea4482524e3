"""Demo mode: the dashboard as a public, shared demo (``ADAPTER_ATLAS_DEMO=1``, the Docker image's default).

On a public host every visitor is a stranger, so in demo mode:

* no page reads a path typed by the user: task data comes from the **bundled task sets** (folders named
  ``tasks`` under the sample adapters) or from files uploaded into the session (kept in memory);
* hub downloads are off, unless the operator lists allowed ids in ``ADAPTER_ATLAS_HUB_ALLOW``
  (comma-separated ``owner/name`` or ``owner/*``);
* compute is capped per session (:class:`Caps`, shown on the pages), and heavy runs (scoring,
  pairwise studies, learned merges) take a slot of a server-wide queue (:func:`heavy_slot`) so that
  one visitor cannot starve the others.

Outside demo mode (a researcher's own machine) paths and the hub stay allowed and nothing is capped.
Upload size caps live in :mod:`geometry.io.limits` (checked in the library, whatever the page).
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ui.adapter_set import samples_dir

DEMO_ENV = "ADAPTER_ATLAS_DEMO"
HUB_ALLOW_ENV = "ADAPTER_ATLAS_HUB_ALLOW"
#: Server-wide number of heavy runs at once in demo mode (2 cores: one run uses both).
HEAVY_SLOTS_ENV = "ADAPTER_ATLAS_HEAVY_SLOTS"


def demo_mode() -> bool:
    """Whether ``$ADAPTER_ATLAS_DEMO`` is set to 1 / true / yes."""
    return os.environ.get(DEMO_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Caps:
    """Per-session compute caps (``None``: no cap)."""

    max_adapters: int | None = None  #: adapters in a session's set
    max_merged: int | None = None  #: adapters in one merge, pairwise study or learned merge
    max_test_examples: int | None = None  #: test examples per task when scoring
    max_learned_samples: int | None = None  #: unlabeled inputs per task for DivMerge / AdaMerging
    max_learned_epochs: int | None = None

    def describe(self) -> str:
        """One line for the pages: what this server allows."""
        if self == Caps():
            return ""
        parts = [f"{self.max_adapters} adapters per session", f"{self.max_merged} adapters per merge or study",
                 f"{self.max_test_examples} test examples per task",
                 f"{self.max_learned_samples} inputs per task and {self.max_learned_epochs} epochs for learned merges"]
        return "Demo server limits: " + ", ".join(parts) + "."


#: The caps of a public demo on a small machine (2 cores): a pairwise study of 6 adapters at 200
#: examples is about 2 minutes; a learned merge of 4 adapters at 100 inputs, 2 epochs, about 1 minute.
DEMO_CAPS = Caps(max_adapters=16, max_merged=6, max_test_examples=200, max_learned_samples=100, max_learned_epochs=2)


def caps() -> Caps:
    return DEMO_CAPS if demo_mode() else Caps()


def capped(value: int, cap: int | None) -> int:
    return value if cap is None else min(value, cap)


# -- task data --------------------------------------------------------------------------------
def bundled_task_sets(root: Path | None = None) -> dict[str, Path]:
    """``{label: folder}`` of the task sets shipped with the sample adapters (folders called ``tasks``)."""
    root = root or samples_dir()
    if not root.is_dir():
        return {}
    found = sorted(p for p in root.rglob("tasks") if p.is_dir() and any(c.is_dir() for c in p.iterdir()))
    return {("sample tasks" if p == root / "tasks" else "/".join(p.relative_to(root).parts)): p for p in found}


# -- hub ----------------------------------------------------------------------------------------
def hub_allowed(repo_id: str) -> tuple[bool, str]:
    """Whether this server may download ``repo_id``, and the reason when not."""
    if not demo_mode():
        return True, ""
    patterns = [p.strip() for p in os.environ.get(HUB_ALLOW_ENV, "").split(",") if p.strip()]
    if not patterns:
        return False, "hub downloads are off on this demo server (upload the adapter as a .zip instead)"
    if any(fnmatch.fnmatchcase(repo_id, p) for p in patterns):
        return True, ""
    return False, f"{repo_id} is not on this demo server's list of allowed hub ids ({', '.join(patterns)})"


# -- heavy runs ---------------------------------------------------------------------------------
_SLOTS: threading.BoundedSemaphore | None = None
_SLOTS_LOCK = threading.Lock()


def _slots() -> threading.BoundedSemaphore:
    global _SLOTS
    with _SLOTS_LOCK:
        if _SLOTS is None:
            _SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get(HEAVY_SLOTS_ENV, "1"))))
        return _SLOTS


@contextmanager
def heavy_slot(waiting=None, poll: float = 0.5, need: int | None = None, waiting_memory=None):
    """Hold one of the server's heavy-run slots (demo mode; a no-op otherwise), then wait until the server's
    memory budget (``ui.memory``) has room for the run's working memory ``need`` (default
    ``ui.memory.HEAVY_RUN_BYTES``).

    ``waiting(seconds)`` is called while another session's run holds every slot (the page shows
    "queued"), ``waiting_memory(seconds, free_bytes)`` while the budget is full; the caller's Streamlit calls
    in them let a Cancel click or a closed tab stop the wait.
    """
    if not demo_mode():
        yield
        return
    from ui import memory

    slots, start = _slots(), time.perf_counter()
    while not slots.acquire(timeout=poll):
        if waiting is not None:
            waiting(time.perf_counter() - start)
    try:
        memory.ledger().wait_for(memory.HEAVY_RUN_BYTES if need is None else need, waiting_memory, poll=poll)
        yield
    finally:
        slots.release()


# -- sessions -------------------------------------------------------------------------------------
def session_liveness(grace: float = 30.0):
    """A callable that says whether the browser session running this script is still there.

    A closed tab disconnects the session; a run started by it (a learned merge in a background thread)
    checks this after each step and stops once the session has been gone for ``grace`` seconds (a
    short network drop reconnects to the same session and does not stop anything). Outside a
    Streamlit server (tests, bare mode): always alive.
    """
    try:
        from streamlit.runtime import Runtime, exists
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        if ctx is None or not exists():
            return lambda: True
        runtime, session_id = Runtime.instance(), ctx.session_id
    except Exception:  # noqa: BLE001  (no runtime: nothing to watch)
        return lambda: True
    gone_since: list[float] = []

    def alive() -> bool:
        if runtime.is_active_session(session_id):
            gone_since.clear()
            return True
        if not gone_since:
            gone_since.append(time.monotonic())
        return time.monotonic() - gone_since[0] < grace

    return alive
