"""The Dockerfile: a fast check of its parser and of the image's invariants, and a slow replay.

No image can be built here (no registry to pull ``python:3.11-slim`` from, no docker), so the slow
test (``-m slow``; 2-4 minutes, most of it ``pip install``) replays the Dockerfile's install and start
steps with ``deploy/replay.py``: a fresh venv (no system site-packages) stands in for the image's
Python, the pip steps run in it (the PyTorch CPU index is unreachable here and dropped, the pins kept:
this machine's pip serves the same torch as a CPU wheel), the COPY steps copy what ``.dockerignore``
lets through, apt-get and user set-up are skipped, then CMD starts streamlit on a free ``PORT``; the
health URL must answer 200, HEALTHCHECK's own command must pass, ``/`` must answer 200, and the
app's script must run in that venv (Streamlit's AppTest) without an exception.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from deploy.dockerfile_steps import Dockerfile, DockerfileError, DockerIgnore, split_commands, words
from deploy.replay import Replay, ReplayError, duration

pytestmark = pytest.mark.docker  # the Dockerfile, its parser and its replayed build (-m "not docker" skips them)
REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ---------------------------------------------------------------------------------------------
# The parser


SAMPLE = r"""# syntax=docker/dockerfile:1
FROM python:3.11-slim AS base
ARG FLAVOUR=cpu
ARG EMPTY
ENV A=1 B="two words" \
    # a comment inside a continuation
    C=${A}-$FLAVOUR
ENV LEGACY value with spaces
ENV D=${MISSING:-fallback} E=${A:+set} F='$A' G=\$A
WORKDIR /srv
WORKDIR app

RUN echo "a && b" && \
    pip install x==1 \
    && echo 'c && d'
COPY --chown=user:user --chmod=755 src/ ./src/
COPY ["a b.txt", "dest/"]
USER 1000
EXPOSE 8501/tcp 9000
HEALTHCHECK --interval=5s --timeout=3s CMD curl -f http://127.0.0.1:8501/_stcore/health || exit 1
CMD ["sh", "-c", "exec run --port ${PORT:-8501}"]
"""


def test_parser_reads_instructions_continuations_and_comments():
    df = Dockerfile.parse(SAMPLE)
    assert [i.keyword for i in df.instructions] == [
        "FROM", "ARG", "ARG", "ENV", "ENV", "ENV", "WORKDIR", "WORKDIR", "RUN", "COPY", "COPY", "USER", "EXPOSE",
        "HEALTHCHECK", "CMD",
    ]
    assert df.base_image == "python:3.11-slim"
    run = df.of("RUN")[0]
    assert run.line == 13
    assert run.commands == ['echo "a && b"', "pip install x==1", "echo 'c && d'"]
    assert split_commands("a&&b && 'c&&d' && \"e\\\"&&f\"") == ["a", "b", "'c&&d'", '"e\\"&&f"']


def test_parser_state_env_args_workdir_user_expose():
    df = Dockerfile.parse(SAMPLE)
    state = df.state()
    assert state.args == {"FLAVOUR": "cpu", "EMPTY": ""}
    assert state.env == {
        "A": "1", "B": "two words", "C": "-cpu", "LEGACY": "value with spaces",  # C: A is not set yet (as Docker)
        "D": "fallback", "E": "set", "F": "$A", "G": "$A",
    }
    assert state.workdir == "/srv/app"
    assert state.user == "1000"
    assert state.expose == [8501, 9000]
    assert df.state({"FLAVOUR": "cuda"}).env["C"] == "-cuda"  # --build-arg overrides the default


def test_parser_flags_exec_forms_copy_and_healthcheck():
    df = Dockerfile.parse(SAMPLE)
    states = dict((ins.line, state) for ins, state in df.walk())
    copy, copy_json = df.of("COPY")
    assert copy.flags == {"chown": "user:user", "chmod": "755"}
    spec = df.copy_of(copy, states[copy.line])
    assert spec.sources == ("src/",) and spec.dest == "/srv/app/src" and spec.dest_is_dir and spec.chown == "user:user"
    spec = df.copy_of(copy_json, states[copy_json.line])
    assert spec.sources == ("a b.txt",) and spec.dest == "/srv/app/dest"
    hc = df.healthcheck
    assert hc.flags == {"interval": "5s", "timeout": "3s"}
    assert hc.argv() == ["/bin/sh", "-c", "curl -f http://127.0.0.1:8501/_stcore/health || exit 1"]
    assert df.cmd.exec_form == ("sh", "-c", "exec run --port ${PORT:-8501}")
    assert words("a 'b c' \"d $X\" e\\ f", {"X": "x"}) == ["a", "b c", "d x", "e f"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("FROM python:3.11\nRUN <<EOF\necho hi\nEOF\n", "heredoc"),
        ("FROM a\nFROM b\n", "exactly one FROM"),
        ("FROM a\nONBUILD RUN x\n", "unsupported instruction"),
        ("# escape=`\nFROM a\n", "escape"),
        ("FROM a\nENV A='unterminated\n", "quote"),
    ],
)
def test_parser_refuses_what_it_cannot_read(text, message):
    with pytest.raises(DockerfileError, match=message):
        Dockerfile.parse(text).state()


def test_dockerignore_semantics(tmp_path):
    ignore = DockerIgnore(
        ["# comment", "", "*.log", "**/__pycache__", "build", "data/*", "!data/keep.txt", "/secret", "docs/**/*.tmp"]
    )
    assert ignore.excluded("x.log") and not ignore.excluded("sub/x.log")  # * stops at /
    assert ignore.excluded("a/b/__pycache__/m.pyc") and ignore.excluded("__pycache__")
    assert ignore.excluded("build/out/file") and not ignore.excluded("builder.py")  # a folder excludes its files
    assert ignore.excluded("data/x.csv") and not ignore.excluded("data/keep.txt")  # ! re-includes, last wins
    assert ignore.excluded("secret") and ignore.excluded("docs/a/b.tmp") and ignore.excluded("docs/b.tmp")
    for rel in ("keep.py", "x.log", "sub/x.log", "data/x.csv", "data/keep.txt", "build/f", "pkg/__pycache__/m.pyc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert ignore.files(tmp_path) == ["data/keep.txt", "keep.py", "sub/x.log"]


def test_repo_dockerignore_keeps_the_app_and_drops_the_rest():
    files = set(DockerIgnore.from_file(REPO / ".dockerignore").files(REPO))
    for needed in ("app.py", "requirements.txt", ".streamlit/config.toml", "cache/README.md"):
        assert needed in files, needed
    for package in ("geometry", "ui", "pages", "sample_adapters"):
        assert any(f.startswith(package + "/") for f in files), package
    for dropped in (".venv/", ".git/", "tests/", "bench/", "test-artifacts/", "cache/numba/", "cache/evaluate/"):
        assert not any(f.startswith(dropped) for f in files), dropped
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


# ---------------------------------------------------------------------------------------------
# The repository's Dockerfile: what a hosted demo needs


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.from_file(DOCKERFILE)


def _pin(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(rf"{re.escape(name)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def test_slim_python_base_matching_the_tested_python(dockerfile):
    import sys

    m = re.fullmatch(r"python:(\d+\.\d+)-slim(?:-\w+)?", dockerfile.base_image)
    assert m, dockerfile.base_image
    assert m.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_torch_comes_from_the_cpu_index_at_the_pinned_version(dockerfile):
    torch_steps = [c for r in dockerfile.of("RUN") for c in r.commands if re.search(r"\btorch==", c)]
    assert len(torch_steps) == 1, torch_steps
    step = torch_steps[0]
    assert step.startswith("pip install") and f"--index-url {TORCH_CPU_INDEX}" in step
    assert f"torch=={_pin('torch')}" in step.split()  # the same pin as requirements.txt


def test_runtime_requirements_leave_out_only_the_test_tools(dockerfile):
    text = " ".join(r.shell for r in dockerfile.of("RUN"))
    m = re.search(r"sed '/\^(# [^/]+)/,\$d' requirements\.txt", text)
    assert m, "the Dockerfile installs requirements.txt up to its test-tools block"
    lines = (REPO / "requirements.txt").read_text().splitlines()
    assert m.group(1) in lines, f"requirements.txt lost its {m.group(1)!r} line"
    cut = lines.index(m.group(1))
    runtime = {line.split("==")[0] for line in lines[:cut] if "==" in line}
    tools = {line.split("==")[0] for line in lines[cut:] if "==" in line}
    assert {"torch", "streamlit", "kaleido", "umap-learn", "numba", "plotly"} <= runtime
    # after the cut: test runners and the documentation / notebook builders, which the image does not need
    assert tools <= {"pytest", "pytest-xdist", "playwright", "ruff", "mkdocs", "mkdocs-material", "mkdocstrings",
                     "mkdocstrings-python", "nbclient", "nbformat", "ipykernel", "jupyter_client"}, tools


def test_runs_as_a_non_root_user_with_uid_1000(dockerfile):
    state = dockerfile.state()
    assert state.user not in ("", "root", "0")
    users = [c for r in dockerfile.of("RUN") for c in r.commands if c.startswith("useradd")]
    assert len(users) == 1 and re.search(r"--uid 1000\b", users[0]) and users[0].split()[-1] == state.user
    assert state.env["HOME"] == f"/home/{state.user}"
    # the app files belong to that user, and every pip install runs before USER (as root, system-wide)
    copies = [i for i in dockerfile.of("COPY") if i.value.split()[0] == "."]
    assert copies and copies[-1].flags.get("chown", "").split(":")[0] == state.user
    user_line = dockerfile.of("USER")[-1].line
    assert all(r.line < user_line for r in dockerfile.of("RUN") if "pip install" in r.shell)


def test_demo_mode_and_writable_caches_under_home(dockerfile, monkeypatch):
    from geometry.analysis.maps import numba_cache_dir

    env = dockerfile.state().env
    assert env["ADAPTER_ATLAS_DEMO"] == "1"
    home = env["HOME"]
    assert env["ADAPTER_ATLAS_CACHE"].startswith(home + "/")
    monkeypatch.setenv("HOME", home)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert env["NUMBA_CACHE_DIR"] == str(numba_cache_dir())  # where the app itself would put it
    assert env.get("NUMBA_CPU_NAME") == "generic"  # the build-time compile is valid on any x86-64 CPU
    mkdir = [c for r in dockerfile.of("RUN") for c in r.commands if c.startswith("mkdir -p")]
    assert mkdir and "$ADAPTER_ATLAS_CACHE" in mkdir[0] and "$NUMBA_CACHE_DIR" in mkdir[0]


def test_cmd_runs_streamlit_headless_on_app_py_at_the_exposed_port(dockerfile):
    cmd = dockerfile.cmd
    assert cmd.exec_form and cmd.exec_form[:2] == ("/bin/sh", "-c")
    line = cmd.exec_form[2]
    assert line.startswith("exec streamlit run app.py ")  # exec: streamlit is PID 1 and gets SIGTERM
    flags = dict(zip(line.split()[4::2], line.split()[5::2], strict=True))
    assert flags == {
        "--server.headless": "true",
        "--server.port": "${PORT:-8501}",
        "--server.address": "0.0.0.0",
        "--server.fileWatcherType": "none",
        "--browser.gatherUsageStats": "false",
    }
    assert dockerfile.state().expose == [8501]


def test_healthcheck_hits_streamlit_health_on_the_same_port(dockerfile):
    hc = dockerfile.healthcheck
    assert hc is not None and hc.value != "NONE"
    assert "http://127.0.0.1:%s/_stcore/health" in hc.shell and "os.environ.get('PORT', '8501')" in hc.shell
    assert {"interval", "timeout", "start-period"} <= set(hc.flags)


def test_chromium_is_optional_and_installed_by_default(dockerfile):
    assert dockerfile.state().args["WITH_CHROMIUM"] == "1"
    apt = [r for r in dockerfile.of("RUN") if "apt-get" in r.shell]
    assert len(apt) == 1 and '"$WITH_CHROMIUM" = "1"' in apt[0].shell
    assert "--no-install-recommends chromium" in apt[0].shell and "rm -rf /var/lib/apt/lists/*" in apt[0].shell


def test_every_step_is_replayable_or_skipped_for_a_stated_reason(dockerfile, tmp_path):
    replay = Replay(scratch=tmp_path, log=lambda _: None)
    replay.build(execute=False)  # classifies and checks every step; runs nothing
    notes = "\n".join(replay.notes)
    assert "skipped: system packages" in notes and "skipped: user set-up" in notes
    assert "PyTorch CPU index dropped" in notes
    assert not tmp_path.joinpath("venv").exists()


def test_replay_maps_image_folders_once(tmp_path):
    replay = Replay(scratch=tmp_path / "s", log=lambda _: None)
    replay.build(execute=False)
    root = tmp_path / "s" / "root"
    text = 'mkdir /tmp/a "/home/user/.cache" /app:/application /home/username https://x.org/app'
    assert replay.map_text(text) == (
        f'mkdir {root}/tmp/a "{root}/home/user/.cache" {root}/app:/application /home/username https://x.org/app'
    )  # one pass: the scratch folder, itself under /tmp, is not mapped a second time
    assert (duration("10s"), duration("1m30s"), duration("500ms")) == (10.0, 90.0, 0.5)


def test_replay_refuses_steps_it_cannot_map(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nWORKDIR /app\nRUN pip install x && rm -rf /usr/lib/y\n")
    with pytest.raises(ReplayError, match="/usr/lib/y"):
        Replay(dockerfile=bad, context=tmp_path, scratch=tmp_path / "s", log=lambda _: None).build(execute=False)
    bad.write_text("FROM python:3.11-slim\nRUN apt-get install -y z && pip install x\n")
    with pytest.raises(ReplayError, match="split this RUN"):
        Replay(dockerfile=bad, context=tmp_path, scratch=tmp_path / "s", log=lambda _: None).build(execute=False)


def test_deploy_doc_matches_the_dockerfile():
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert "docker build -t adapter-atlas . && docker run -p 8501:8501 adapter-atlas" in doc
    assert "sdk: docker" in doc and "app_port: 8501" in doc
    for var in ("ADAPTER_ATLAS_DEMO", "ADAPTER_ATLAS_CACHE", "ADAPTER_ATLAS_THREADS", "PORT", "WITH_CHROMIUM"):
        assert f"`{var}" in doc, var


# ---------------------------------------------------------------------------------------------
# The replay (slow: a real pip install into a fresh venv)


APP_SCRIPT = """
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("app.py", default_timeout=240).run()
assert not at.exception, [e.value for e in at.exception]
print("app ran:", len(at.sidebar.markdown), "sidebar blocks,", len(at.main.children), "main blocks")
"""


@pytest.fixture
def scratch():
    """A scratch folder removed afterwards (the venv is about 2 GB: not left in pytest's tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="adapter-atlas-replay-") as path:
        yield Path(path)


@pytest.mark.slow
def test_replayed_build_serves_the_health_endpoint(scratch):
    t0 = time.perf_counter()
    lines: list[str] = []
    replay = Replay(scratch=scratch, log=lines.append)
    try:
        final = replay.build()
    except ReplayError as exc:
        pytest.fail(f"{exc}\n" + "\n".join(lines))
    built = time.perf_counter() - t0
    venv_python = replay.venv / "bin" / "python"
    # the install is the venv's own: torch at the pinned version, a CPU build, no test tools
    probe = subprocess.run(
        [str(venv_python), "-c", "import sys, torch, streamlit; print(torch.__version__, torch.version.cuda, sys.prefix)"],
        capture_output=True, text=True, env=replay.environment(final), check=True,
    ).stdout.split()
    assert probe[0].split("+")[0] == _pin("torch") and probe[1] == "None" and probe[2] == str(replay.venv)
    assert not (replay.venv / "bin" / "pytest").exists() and not (replay.venv / "bin" / "playwright").exists()
    app_dir = replay.host(final.workdir)
    assert (app_dir / "app.py").is_file() and not (app_dir / "tests").exists() and not (app_dir / ".venv").exists()
    numba_cache = replay.host(final.env["NUMBA_CACHE_DIR"])
    assert replay.host(final.env["ADAPTER_ATLAS_CACHE"]).is_dir()
    if final.args.get("PREWARM_NUMBA") == "1":  # the build-time compile left UMAP's code in the app's cache
        assert any(numba_cache.rglob("*.nbi")), "no numba cache index after the pre-warm"

    with replay.serve() as server:
        healthy = server.wait_healthy(timeout=120)
        status, body = server.get(server.health_path)
        assert (status, body.strip()) == (200, b"ok")
        check = server.healthcheck()
        assert check.returncode == 0, check.stderr  # HEALTHCHECK's own command, following $PORT
        status, body = server.get("/")
        assert status == 200 and b"<html" in body.lower()
        # the page's script itself, in the replayed venv and environment (demo mode on)
        app = subprocess.run(
            [str(venv_python), "-c", APP_SCRIPT], cwd=app_dir, env=server.env, capture_output=True, text=True,
            timeout=300,
        )
        assert app.returncode == 0, f"{app.stdout[-2000:]}\n{app.stderr[-4000:]}"
    packages = sum(f.stat().st_size for f in replay.venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(
        f"\nreplay: build {built:.0f} s, healthy {healthy:.1f} s after start, total {time.perf_counter() - t0:.0f} s,"
        f" venv {packages / 2**30:.2f} GiB\n"
        + "\n".join(lines)
        + f"\n{app.stdout.strip()}"
    )
