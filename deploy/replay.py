"""Replay the Dockerfile's install and start steps on this machine, without Docker.

Images cannot be pulled here (no registry, no docker), so ``tests/test_dockerfile.py`` checks the
Dockerfile by doing, step by step in a scratch folder, what ``docker build`` and ``docker run`` do:

* FROM ``python:X.Y-…``: a fresh ``python3 -m venv`` stands in for the image's Python (the machine's
  ``python3`` must be X.Y). No ``--system-site-packages``: every package comes from the replayed installs.
* ARG, ENV, WORKDIR: the same values. The image's absolute folders (each WORKDIR, ``$HOME``, ``/tmp``)
  are mapped to ``<scratch>/root/…`` in every value and command, so nothing is written outside the scratch folder.
* COPY: the named files of the build context, filtered by ``.dockerignore`` (:class:`DockerIgnore`);
  ``--chown`` is not replayed (everything belongs to the current user).
* RUN: ``/bin/sh -c`` in the mapped WORKDIR with the venv first on ``PATH``, so ``pip`` and ``python`` are
  the venv's, and the ARG values in the environment as Docker gives them. Changes, each reported:

  - a RUN calling apt-get (system packages: chromium for SVG / PDF export) or setting up the user
    (useradd, chown…) is skipped: the replay runs as the current user, on this machine's packages;
  - ``--index-url https://download.pytorch.org/whl/cpu`` is dropped: that index cannot be reached here.
    The same pinned ``torch==…`` then comes from this machine's pip configuration, which serves it as a
    CPU wheel, so the versions installed are the ones the image gets;
  - ``--no-cache-dir`` is dropped so that pip's cache is reused between replays (the packages are still
    installed into the fresh venv);
  - any other absolute path (outside the mapped folders) makes the replay refuse the step.
* USER: not replayed. EXPOSE, HEALTHCHECK, CMD: recorded; :meth:`Replay.serve` then starts CMD with
  ``PORT`` set to a free port and :class:`Server` polls the health URL and runs HEALTHCHECK's command.

By hand: ``python -m deploy.replay [--scratch DIR] [--port N]`` builds, starts the server and keeps it
running until Ctrl-C (add ``--build-arg PREWARM_NUMBA=0`` to skip the numba compile).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deploy.dockerfile_steps import Dockerfile, DockerfileError, DockerIgnore, Instruction, State

REPO = Path(__file__).resolve().parents[1]

#: The PyTorch CPU index (and any other download.pytorch.org index): unreachable here, dropped.
TORCH_INDEX = re.compile(r"\s*--(?:extra-)?index-url(?:=|\s+)['\"]?https://download\.pytorch\.org/whl/\S*")
NO_CACHE = re.compile(r"\s+--no-cache-dir\b")
#: Programs whose RUN steps are not replayed, and why.
SYSTEM = re.compile(r"(?<![\w./-])(apt-get|apt|dpkg|apk)(?![\w-])")
USER_SETUP = re.compile(r"(?<![\w./-])(useradd|groupadd|adduser|addgroup|usermod|groupmod|chown)(?![\w-])")
REPLAYABLE = re.compile(r"(?<![\w./-])(pip3?|python3?)(?![\w-])")
#: An absolute path in a command: ``/`` not preceded by a word character, ``.``, ``:``, ``/`` or ``$``.
ABSOLUTE = re.compile(r"(?<![\w.:/$~-])/(?=[A-Za-z0-9_.])[A-Za-z0-9_.+@-]+(?:/[A-Za-z0-9_.+@*-]+)*")
ALLOWED_ABSOLUTE = ("/dev/null", "/bin/sh", "/bin/bash")
#: Variables of this machine a container would not have (the app's, Streamlit's and numba's settings).
HOST_ONLY = ("ADAPTER_ATLAS_", "STREAMLIT_", "NUMBA_")
HEALTH_PATH = re.compile(r"https?://(?:127\.0\.0\.1|localhost)(?::[^/\s'\"]*)?(/[^\s'\")]*)")


class ReplayError(RuntimeError):
    """The Dockerfile has a step the replay cannot run faithfully, or a replayed step failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def duration(text: str) -> float:
    """A Docker (Go) duration in seconds: ``30s``, ``1m30s``, ``500ms``, ``1h``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ReplayError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


@dataclass
class Replay:
    """The build replayed in ``scratch``: call :meth:`build`, then :meth:`serve`."""

    dockerfile: Path = REPO / "Dockerfile"
    context: Path = REPO
    scratch: Path = Path("/tmp/adapter-atlas-replay")
    build_args: dict[str, str] = field(default_factory=dict)
    python: str = "python3"
    log: Callable[[str], None] = print
    step_timeout: float = 900.0
    notes: list[str] = field(default_factory=list)  # what was replayed, skipped or changed, line by line

    def __post_init__(self) -> None:
        self.dockerfile = Path(self.dockerfile)
        self.context = Path(self.context)
        self.scratch = Path(self.scratch)
        self.df = Dockerfile.from_file(self.dockerfile)
        self.ignore = DockerIgnore.from_file(self.context / ".dockerignore")
        self.root = self.scratch / "root"  # the image's filesystem, for the mapped folders
        self.venv = self.scratch / "venv"
        self.final: State | None = None
        self._roots: list[str] = ["/tmp"]

    # -- paths ----------------------------------------------------------------------------------

    def _add_root(self, path: str) -> None:
        if path not in ("/", "") and path not in self._roots:
            self._roots.append(path)
            self._roots.sort(key=len, reverse=True)

    def host(self, image_path: str) -> Path:
        """Where an absolute path of the image lives in the replay (``/app/x`` -> ``<scratch>/root/app/x``)."""
        return self.root / image_path.lstrip("/")

    def map_text(self, text: str) -> str:
        """``text`` with each mapped image folder (WORKDIR, $HOME, /tmp) replaced by its replay folder."""
        alternatives = "|".join(re.escape(r) for r in self._roots)  # longest first; one pass, never re-mapped
        pattern = rf"(?<![\w.:/-])(?:{alternatives})(?=/|$|[\s'\";:`)])"
        return re.sub(pattern, lambda m: str(self.host(m.group(0))), text)

    def _unmapped(self, text: str) -> list[str]:
        out = []
        for m in ABSOLUTE.finditer(text):
            path = m.group(0)
            if path in ALLOWED_ABSOLUTE:
                continue
            if not any(path == r or path.startswith(r + "/") for r in self._roots):
                out.append(path)
        return out

    # -- environment -----------------------------------------------------------------------------

    def environment(self, state: State) -> dict[str, str]:
        """The process environment of a RUN / CMD in ``state``: this machine's, plus ARG and ENV values
        (mapped), with the venv first on PATH and pip's no-cache setting left out. This machine's own
        settings of the app, Streamlit and numba (``HOST_ONLY``) are dropped: a container has only the image's."""
        env = {
            k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH") and not k.startswith(HOST_ONLY)
        }
        for key, value in {**state.args, **state.env}.items():
            if key == "PIP_NO_CACHE_DIR":
                continue
            if key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL") and "download.pytorch.org" in value:
                continue
            env[key] = self.map_text(value)
        path = os.environ.get("PATH", os.defpath)
        if "PATH" in state.env:  # the image's PATH, mapped, before this machine's
            path = self.map_text(state.env["PATH"]) + os.pathsep + path
        env["PATH"] = str(self.venv / "bin") + os.pathsep + path
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    # -- steps -----------------------------------------------------------------------------------

    def _note(self, ins: Instruction, text: str) -> None:
        line = f"line {ins.line} {ins.keyword}: {text}"
        self.notes.append(line)
        self.log(line)

    def _from(self, ins: Instruction) -> None:
        image = self.df.base_image
        m = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)", image)
        if not m:
            raise ReplayError(f"line {ins.line}: the replay needs a python:X.Y base image, not {image!r}")
        want = m.group(1)
        have = subprocess.run(
            [self.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if have != want:
            raise ReplayError(f"{image} has Python {want} but {self.python} here is {have}")
        subprocess.run([self.python, "-m", "venv", str(self.venv)], check=True)
        self._note(ins, f"{image}: a fresh venv from {self.python} (Python {have}), no system site-packages")

    def _copy(self, ins: Instruction, state: State) -> None:
        spec = self.df.copy_of(ins, state)
        context_files = self.ignore.files(self.context)
        dest = self.host(spec.dest)
        copied = 0
        for source in spec.sources:
            source = source.strip("/") if source not in (".", "./") else ""
            if source and not (self.context / source).exists() and not any(c in source for c in "*?["):
                raise ReplayError(f"line {ins.line}: COPY source {source!r} is not in the build context")
            if source == "" or (self.context / source).is_dir():
                prefix = source + "/" if source else ""
                chosen = [(f, f[len(prefix) :]) for f in context_files if f.startswith(prefix)]
                target_dir = dest
            else:
                pattern = re.compile(
                    "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in source)
                )
                chosen = [(f, Path(f).name) for f in context_files if pattern.fullmatch(f)]
                if not chosen:
                    raise ReplayError(f"line {ins.line}: COPY {source!r} matches nothing (or only ignored files)")
                target_dir = dest if spec.dest_is_dir or len(chosen) > 1 else dest.parent
                if not (spec.dest_is_dir or len(chosen) > 1):
                    chosen = [(chosen[0][0], dest.name)]
            for rel, name in chosen:
                target = target_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.context / rel
                if src.is_symlink():
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    target.symlink_to(os.readlink(src))
                else:
                    shutil.copy2(src, target)
                copied += 1
        chown = f"; --chown={spec.chown} not replayed (files belong to the current user)" if spec.chown else ""
        self._note(ins, f"{copied} file(s) from the context (.dockerignore applied) to {spec.dest}{chown}")

    def classify(self, ins: Instruction) -> tuple[str | None, str, list[str]]:
        """A RUN's fate: ``(skip reason or None, the command to run, the changes made to it)``.

        Raises :class:`ReplayError` for a RUN the replay cannot run faithfully."""
        text = ins.shell
        if SYSTEM.search(text):
            if REPLAYABLE.search(text):
                raise ReplayError(f"line {ins.line}: split this RUN: it mixes system packages with Python steps")
            return "system packages (apt-get): this machine's are used (chromium for SVG / PDF export)", text, []
        if USER_SETUP.search(text):
            if REPLAYABLE.search(text):
                raise ReplayError(f"line {ins.line}: split this RUN: it mixes user set-up with Python steps")
            return "user set-up: the replay runs as the current user", text, []
        changes = []
        if TORCH_INDEX.search(text):
            # download.pytorch.org cannot be reached here: drop the index and keep the pins; this
            # machine's pip configuration serves the same torch version as a CPU wheel.
            text = TORCH_INDEX.sub("", text)
            changes.append("PyTorch CPU index dropped: unreachable here; the same pins install from this machine's pip configuration")
        if NO_CACHE.search(text):
            text = NO_CACHE.sub("", text)
            changes.append("--no-cache-dir dropped: pip's cache is reused")
        unmapped = self._unmapped(text)
        if unmapped:
            raise ReplayError(f"line {ins.line}: absolute path(s) outside the mapped folders {self._roots}: {unmapped}")
        return None, text, changes

    def _run(self, ins: Instruction, state: State, execute: bool) -> None:
        skip, text, changes = self.classify(ins)
        if skip:
            self._note(ins, f"skipped: {skip}")
            return
        self._note(ins, "run" + (f" ({'; '.join(changes)})" if changes else "") + f": {text}")
        if not execute:
            return
        self._make_roots()
        cwd = self.host(state.workdir)
        t0 = time.perf_counter()
        done = subprocess.run(
            ["/bin/sh", "-c", self.map_text(text)], cwd=cwd, env=self.environment(state),
            timeout=self.step_timeout, capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise ReplayError(
                f"line {ins.line}: RUN failed (exit {done.returncode}) after {time.perf_counter() - t0:.0f} s:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        self.log(f"  ... {time.perf_counter() - t0:.0f} s")

    def build(self, execute: bool = True) -> State:
        """Replay FROM to the last instruction; returns the final state (the container's).

        ``execute=False`` only plans: every step is classified (``notes``) and checked, nothing runs."""
        if execute:
            self.scratch.mkdir(parents=True, exist_ok=True)
        for ins, state in self.df.walk(self.build_args):
            kw = ins.keyword
            if kw == "FROM":
                if execute:
                    self._from(ins)
                else:
                    self._note(ins, f"{self.df.base_image}: a fresh venv")
            elif kw in ("ARG", "ENV", "LABEL", "EXPOSE", "STOPSIGNAL"):
                if kw == "ENV" and "HOME" in state.env:
                    self._add_root(state.env["HOME"])
            elif kw == "WORKDIR":
                self._add_root(state.workdir)
                if execute:
                    self.host(state.workdir).mkdir(parents=True, exist_ok=True)
            elif kw in ("COPY", "ADD"):
                if execute:
                    self._copy(ins, state)
                else:
                    self.df.copy_of(ins, state)  # checks the form
            elif kw == "RUN":
                self._run(ins, state, execute)
            elif kw == "USER":
                self._note(ins, f"{state.user}: not replayed (runs as the current user)")
            elif kw in ("HEALTHCHECK", "CMD", "ENTRYPOINT"):
                pass
            else:
                raise DockerfileError(f"line {ins.line}: the replay does not know {kw}")
            self.final = state
        if execute:
            self._make_roots()
        return self.final

    def _make_roots(self) -> None:
        """The mapped folders exist in the image (/tmp, WORKDIR, the user's $HOME from useradd)."""
        for root in self._roots:
            self.host(root).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def serve(self, port: int | None = None) -> Iterator[Server]:
        """Start CMD as ``docker run`` would (final WORKDIR and ENV, ``PORT`` set); stopped on exit."""
        if self.final is None:
            raise ReplayError("build() first")
        if self.df.last("ENTRYPOINT") is not None:
            raise ReplayError("ENTRYPOINT is not replayed: use CMD")
        cmd = self.df.cmd
        if cmd is None:
            raise ReplayError("no CMD")
        port = port or free_port()
        env = self.environment(self.final) | {"PORT": str(port)}
        log_path = self.scratch / "server.log"
        argv = [self.map_text(a) for a in cmd.argv()]
        self.log(f"line {cmd.line} CMD (PORT={port}): {' '.join(argv)}")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv, cwd=self.host(self.final.workdir), env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(self, proc, port, env, log_path)
        try:
            yield server
        finally:
            server.stop()


@dataclass
class Server:
    replay: Replay
    process: subprocess.Popen
    port: int
    env: dict[str, str]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_path(self) -> str:
        hc = self.replay.df.healthcheck
        m = HEALTH_PATH.search(hc.shell) if hc is not None else None
        if not m:
            raise ReplayError("HEALTHCHECK names no http://127.0.0.1…/path URL")
        return m.group(1)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.is_file() else ""

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """``GET url+path``: (status, body); status 0 when the connection fails."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, b""

    def wait_healthy(self, timeout: float = 120.0) -> float:
        """Poll the HEALTHCHECK's URL until it answers 200; returns the seconds it took."""
        t0 = time.perf_counter()
        path = self.health_path
        while time.perf_counter() - t0 < timeout:
            if self.process.poll() is not None:
                raise ReplayError(f"the server exited ({self.process.returncode}):\n{self.log_tail()}")
            status, _ = self.get(path, timeout=5)
            if status == 200:
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise ReplayError(f"{self.url}{path} not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def healthcheck(self) -> subprocess.CompletedProcess:
        """HEALTHCHECK's own command, run as Docker runs it (same environment), within its --timeout."""
        hc = self.replay.df.healthcheck
        if hc is None or hc.value == "NONE":
            raise ReplayError("no HEALTHCHECK")
        seconds = duration(hc.flags.get("timeout", "30s"))
        argv = [self.replay.map_text(a) for a in hc.argv()]
        return subprocess.run(
            argv, cwd=self.replay.host(self.replay.final.workdir), env=self.env, capture_output=True, text=True,
            timeout=seconds + 5,
        )

    def stop(self) -> None:
        """SIGTERM to the server's own process group (started with it), then SIGKILL after 15 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/adapter-atlas-replay"))
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    if args.scratch.exists():
        shutil.rmtree(args.scratch)
    replay = Replay(scratch=args.scratch, build_args=dict(a.split("=", 1) for a in args.build_arg))
    replay.build()
    with replay.serve(args.port) as server:
        print(f"healthy after {server.wait_healthy():.1f} s: {server.url} (Ctrl-C stops it)")
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
