"""A server-wide memory budget for a hosted dashboard: one number every session's uploads are counted against.

Demo mode caps each session (16 adapters, 200 MB per upload: :mod:`ui.demo`), but eight visitors at their caps
would hold more than a small host has. So a demo server (or any server given ``$ADAPTER_ATLAS_MEMORY_BUDGET``)
keeps one ledger (:func:`ledger`, a :class:`MemoryBudget`) of the bytes it holds for its visitors:

* **sessions**: the tensors of each session's uploaded and hub adapters (the bundled samples are shared by every
  session and counted once, as a gauge);
* **gauges**, read when needed: the loaded base models (``geometry.runtime.bases``), the shared figure cache
  (``ui.cache.FIGURES``), and the bundled sample sets held in memory.

Rules:

1. An upload (or hub download) that would take the total over the budget is refused before it is loaded, with a
   message that says how much is held, what it needs, and what the visitor can do (:meth:`MemoryBudget.admit`).
   Before refusing, idle sessions' uploads are released and the figure cache is emptied.
2. A session idle for ``$ADAPTER_ATLAS_IDLE_RELEASE_S`` seconds (default 1800) has its uploads released when room
   is needed or at the next sweep (:meth:`MemoryBudget.expire_idle`); when the visitor comes back the sidebar says
   which adapters went and why (:meth:`MemoryBudget.notice`). Nothing else removes a session's adapters.
3. A heavy run (scoring, pairwise study, learned merge) waits until the ledger has room for its working memory
   (:data:`HEAVY_RUN_BYTES`, or the size of the base it must load), as it waits for a slot (``ui.demo.heavy_slot``).

The budget is the bytes of what is counted, not the process's RSS: Python, torch and the Streamlit runtime come on
top (about 1 GB for the real sample set). The default, half of the machine's memory (its cgroup's limit when it
has one), leaves room for that. Streamlit's own ``st.cache_data`` entries are bounded by their ``max_entries``
and not counted. The pressure test (``bench/memory_pressure.py``) checks the process's peak RSS against the
budget under many uploading sessions.

Pure Python (no Streamlit import): the sidebar, the queue and the tests call the same functions.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_ENV = "ADAPTER_ATLAS_MEMORY_BUDGET"
IDLE_ENV = "ADAPTER_ATLAS_IDLE_RELEASE_S"
DEFAULT_IDLE_S = 1800.0
#: held while an upload is admitted and decoded (zip member, tensors, float32 copies): one at a time per server
LOAD_LOCK = threading.Lock()
#: working memory a heavy run is assumed to need besides what the ledger counts (activations, a merged update)
HEAVY_RUN_BYTES = 256 * 2**20
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


class OverBudget(Exception):
    """An upload or a run that does not fit the server's memory budget; the message is for the visitor."""


def parse_bytes(text: str) -> int:
    """``"6G"``, ``"800 MB"``, ``"1.5GiB"``, ``"123456"`` -> bytes (binary units); ``ValueError`` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected a size such as 6G, 800M or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{BUDGET_ENV}={text!r}: the budget must be positive")
    return int(value)


def machine_memory() -> int:
    """Bytes of memory this process may use: its cgroup's limit when it has one (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), else the machine's physical memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def budget_from_env() -> int:
    """``$ADAPTER_ATLAS_MEMORY_BUDGET`` (see :func:`parse_bytes`), else half of :func:`machine_memory`."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    return parse_bytes(text) if text else machine_memory() // 2


def idle_from_env() -> float:
    try:
        return max(1.0, float(os.environ.get(IDLE_ENV, DEFAULT_IDLE_S)))
    except ValueError:
        return DEFAULT_IDLE_S


def enforced() -> bool:
    """Whether this server enforces the budget: in demo mode, or when ``$ADAPTER_ATLAS_MEMORY_BUDGET`` is set."""
    from ui import demo

    return demo.demo_mode() or bool(os.environ.get(BUDGET_ENV, "").strip())


def tensor_bytes(tensors: Iterable) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors if t is not None)


def adapter_bytes(adapter) -> int:
    """Bytes of an adapter's tensors (factors, DoRA magnitudes, heads and other saved tensors)."""
    parts = [t for m in adapter.modules.values() for t in (m.A, m.B, m.magnitude)]
    return tensor_bytes(parts) + tensor_bytes(adapter.other_tensors.values())


def fmt(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MB"


@dataclass
class Holding:
    """One session's entry: bytes of its uploads, their names, when it last ran a script, how to release them."""

    nbytes: int = 0
    names: list[str] = field(default_factory=list)
    last_seen: float = 0.0
    release: Callable[[], None] | None = None
    reserved: int = 0  #: admitted but not loaded yet (an upload in progress)


class MemoryBudget:
    """The ledger (see the module docstring). Thread-safe; ``clock`` is injectable for tests."""

    def __init__(self, limit: int, idle_s: float = DEFAULT_IDLE_S, clock: Callable[[], float] = time.monotonic):
        self.limit, self.idle_s, self.clock = int(limit), float(idle_s), clock
        self._sessions: dict[str, Holding] = {}
        self._gauges: dict[str, Callable[[], int]] = {}
        self._shrinkers: list[Callable[[], None]] = []
        self._notices: dict[str, str] = {}
        self._lock = threading.RLock()
        #: counters for the pressure test and the closing note
        self.refusals = 0
        self.released_sessions = 0

    # ------------------------------------------------------------------------------------------ what is held
    def add_gauge(self, name: str, read: Callable[[], int], shrink: Callable[[], None] | None = None) -> None:
        """Count ``read()`` bytes under ``name``; ``shrink`` (optional) empties it when room is needed."""
        with self._lock:
            self._gauges[name] = read
            if shrink is not None:
                self._shrinkers.append(shrink)

    def usage(self) -> dict[str, int]:
        """``{"sessions": ..., <gauge>: ..., "total": ...}`` in bytes."""
        with self._lock:
            out = {"sessions": sum(h.nbytes + h.reserved for h in self._sessions.values())}
            for name, read in self._gauges.items():
                try:
                    out[name] = int(read())
                except Exception:  # noqa: BLE001  (a gauge that cannot be read counts as 0, not as a crash)
                    out[name] = 0
        out["total"] = sum(out.values())
        return out

    def held(self) -> int:
        return self.usage()["total"]

    def headroom(self) -> int:
        return self.limit - self.held()

    def session_bytes(self, session_id: str) -> int:
        with self._lock:
            h = self._sessions.get(session_id)
            return 0 if h is None else h.nbytes + h.reserved

    # ------------------------------------------------------------------------------------------ sessions
    def touch(self, session_id: str, nbytes: int | None = None, names: Iterable[str] | None = None,
              release: Callable[[], None] | None = None) -> None:
        """A script run of ``session_id``: it is not idle; with ``nbytes``, what its uploads hold now."""
        with self._lock:
            h = self._sessions.setdefault(session_id, Holding())
            h.last_seen = self.clock()
            if nbytes is not None:
                h.nbytes, h.reserved = int(nbytes), 0
                h.names = list(names or [])
            if release is not None:
                h.release = release

    def forget(self, session_id: str) -> None:
        """The session has ended (its tab closed): nothing of it is held any more."""
        with self._lock:
            self._sessions.pop(session_id, None)
            self._notices.pop(session_id, None)

    def forget_ended(self, alive: Callable[[str], bool]) -> None:
        with self._lock:
            for sid in [s for s in self._sessions if not alive(s)]:
                self.forget(sid)

    def expire_idle(self) -> list[str]:
        """Release the uploads of every session idle for ``idle_s`` seconds; the sessions released."""
        now, gone = self.clock(), []
        with self._lock:
            for sid, h in self._sessions.items():
                if h.nbytes > 0 and now - h.last_seen >= self.idle_s:
                    if h.release is not None:
                        try:
                            h.release()
                        except Exception:  # noqa: BLE001  (a session that cannot be released keeps its entry)
                            continue
                    minutes = self.idle_s / 60
                    self._notices[sid] = (
                        f"Your uploaded adapters ({', '.join(h.names)}) were released after {minutes:.0f} minutes "
                        f"without activity, to free this server's memory for other visitors. Upload them again to "
                        f"go on; the samples and your settings are as you left them.")
                    h.nbytes, h.names, h.release = 0, [], None
                    gone.append(sid)
            self.released_sessions += len(gone)
        return gone

    def notice(self, session_id: str) -> str | None:
        """The message for a visitor whose uploads were released while away (once)."""
        with self._lock:
            return self._notices.pop(session_id, None)

    # ------------------------------------------------------------------------------------------ admission
    def _make_room(self, need: int) -> bool:
        if self.held() + need <= self.limit:
            return True
        self.expire_idle()
        if self.held() + need <= self.limit:
            return True
        for shrink in list(self._shrinkers):
            try:
                shrink()
            except Exception:  # noqa: BLE001
                pass
        return self.held() + need <= self.limit

    def admit(self, session_id: str, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` for ``session_id``'s upload ``what`` or raise :class:`OverBudget` saying why."""
        with self._lock:
            if self._make_room(nbytes):
                h = self._sessions.setdefault(session_id, Holding(last_seen=self.clock()))
                h.reserved += int(nbytes)
                return
            self.refusals += 1
            usage = self.usage()
            mine = self.session_bytes(session_id)
        raise OverBudget(
            f"{what}: not loaded. This server's memory budget for every visitor's adapters, loaded models and caches "
            f"is {fmt(self.limit)} and {fmt(usage['total'])} of it is in use ({fmt(mine)} by your uploads); this "
            f"upload needs about {fmt(nbytes)}. Remove adapters you no longer need (sidebar: Rename or remove), "
            "try again in a few minutes (idle visitors' uploads are released), or run Adapter Atlas on your own "
            "machine (README), where nothing is capped.")

    def cancel(self, session_id: str, nbytes: int) -> None:
        """Undo :meth:`admit` (the upload failed to load)."""
        with self._lock:
            h = self._sessions.get(session_id)
            if h is not None:
                h.reserved = max(0, h.reserved - int(nbytes))

    def wait_for(self, nbytes: int, waiting: Callable[[float, int], None] | None = None, poll: float = 0.5,
                 timeout: float | None = None) -> bool:
        """Block until ``nbytes`` fit under the budget (a heavy run's working memory); ``waiting(seconds, free)``
        is called meanwhile. ``False`` after ``timeout`` seconds without room."""
        start = time.monotonic()
        while True:
            with self._lock:
                if self._make_room(nbytes):
                    return True
                free = self.headroom()
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                return False
            if waiting is not None:
                waiting(waited, free)
            time.sleep(poll)


# -------------------------------------------------------------------------------------------- the server's ledger
_LEDGER: MemoryBudget | None = None
_LEDGER_LOCK = threading.Lock()


def _base_bytes() -> int:
    from geometry.runtime import bases

    return bases.loaded_bytes()


def _figure_bytes() -> int:
    from ui import cache

    with cache.FIGURES_LOCK:
        return int(cache.FIGURES.currsize)


def _clear_figures() -> None:
    from ui import cache

    with cache.FIGURES_LOCK:
        cache.FIGURES.clear()


def ledger() -> MemoryBudget:
    """This server's ledger, made on first use from the environment, with the gauges of the loaded bases and
    the figure cache (the sample sets are added by ``ui.state`` when it loads one)."""
    global _LEDGER
    with _LEDGER_LOCK:
        if _LEDGER is None:
            _LEDGER = MemoryBudget(budget_from_env(), idle_from_env())
            _LEDGER.add_gauge("loaded bases", _base_bytes)
            _LEDGER.add_gauge("figure cache", _figure_bytes, shrink=_clear_figures)
        return _LEDGER


def reset_ledger() -> None:
    """Forget the ledger (tests; the next :func:`ledger` reads the environment again)."""
    global _LEDGER
    with _LEDGER_LOCK:
        _LEDGER = None


_SIZES = {"F64": 8, "F32": 4, "F16": 4, "BF16": 4, "F8_E4M3": 4, "F8_E5M2": 4, "I64": 8, "I32": 4, "I16": 2,
          "I8": 1, "U8": 1, "BOOL": 1}  # after loading: half and 8-bit floats become float32


def _safetensors_bytes(head: bytes, size: int) -> int:
    """Bytes a ``.safetensors`` file holds once loaded, from its header (``head``: its first bytes); the file
    size when the header cannot be read."""
    import json
    import struct

    try:
        n = struct.unpack("<Q", head[:8])[0]
        header = json.loads(head[8:8 + n])
        total = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= int(d)
            total += count * _SIZES.get(info["dtype"], 4)
        return total
    except Exception:  # noqa: BLE001  (the loader reports a damaged file)
        return size


def upload_size(files: Iterable[tuple[str, bytes]]) -> int:
    """What loading ``files`` (name, bytes) will hold: each ``.safetensors`` (loose or in a zip) by its header,
    half precision counted as the float32 it becomes; other weight files by their size. (The loader checks each
    file again against its own limits.)"""
    import io
    import zipfile

    total = 0
    for name, data in files:
        lower = name.lower()
        if lower.endswith(".zip"):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    for info in zf.infolist():
                        member = info.filename.lower()
                        if member.endswith(".safetensors"):
                            with zf.open(info) as fh:
                                head = fh.read(8)
                                if len(head) == 8:
                                    head += fh.read(min(int.from_bytes(head, "little"), 100 * 2**20))
                            total += _safetensors_bytes(head, info.file_size)
                        elif member.endswith((".bin", ".pt", ".pth")):
                            total += info.file_size
                continue
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
                pass  # the loader says what is wrong with it
        total += _safetensors_bytes(data, len(data)) if lower.endswith(".safetensors") else len(data)
    return total
