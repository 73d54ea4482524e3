"""Build the repository's Dockerfile with podman, run the image, and check the dashboard it serves.

    python -m deploy.image_check [--keep] [--json FILE]

This script builds the real image and runs it (it replaced a Dockerfile parser and replayer that stood in for
a build): /_stcore/health within 60 s, the HEALTHCHECK, every page through the websocket client
``bench/st_protocol.py``, an upload, one page drawn in headless chromium (playwright), the user (uid 1000),
the demo mode, and a clean ``podman stop`` (SIGTERM handled). It then reports the image's size and what
makes it large. Exit status 0 when every check passed, 1 otherwise; ``SKIPPED: <reason>`` and 0 where
podman cannot be installed or cannot run a container (a CI machine without it says why instead of failing).

Workarounds for a sandboxed CI machine, each needed here:

- docker.io is unreachable, so the base image ``python:3.11-slim-bookworm`` is made locally: debootstrap
  (minbase) from the Debian mirror apt already uses, Debian's python3 (3.11 on bookworm) with a venv at
  /usr/local, so that /usr/local/bin/python and pip exist as in the official image, and its apt/dpkg
  settings (no .deb cache, no docs or locales) so that the size figures compare; imported once and
  tagged under the official name (``--pull=never`` then finds it).
- A ``containers.conf`` (named by ``CONTAINERS_CONF``, in a temp dir; /etc is left alone) selects runc
  (crun refuses this cgroup v1/v2 hybrid layout), cgroupfs and a file events log (no systemd), and
  ``default_ulimits`` within the sandbox's hard limits (podman's defaults exceed them: runc fails
  "error setting rlimits").
- The build's pip steps see this machine's pip setup, mounted read-only for the build only (only empty
  mount points stay in the image): a generated /etc/pip.conf reproducing the host's ``pip config list``
  (CA bundle, local wheels, file:// indexes, constraints) with one retry and a 15 s timeout, so that the
  unreachable ``download.pytorch.org`` index fails fast and torch comes from the local ``+cpu`` wheel.
- ``--format docker``: the OCI format drops the HEALTHCHECK. Without systemd podman cannot schedule the
  HEALTHCHECK (it logs "unable to get systemd connection"); ``podman healthcheck run`` runs it once.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/python:3.11-slim-bookworm"
BASE_ALIAS = "docker.io/library/python:3.11-slim-bookworm"
IMAGE, NAME = "adapter-atlas:check", "atlas-check"
PAGES = ["", "anatomy", "distances", "inclusion", "tokens", "merge", "learned", "survey"]
PREREQS = ["podman", "buildah", "debootstrap", "runc"]
BASE_PACKAGES = "python3 python3-pip python3-venv ca-certificates netbase tzdata"
LOG = Path(tempfile.gettempdir()) / "adapter-atlas-image-build.log"
PATH_ENV = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


class Skip(Exception):
    """podman cannot work on this machine: print SKIPPED and exit 0."""


class Failure(Exception):
    """A step failed after podman was shown to work."""


def sh(cmd: list[str] | str, timeout: float = 600, check: bool = True, what: str = "", **kw):
    """Run ``cmd`` (stdout and stderr together, as text); a failure raises with the output's tail."""
    try:
        proc = subprocess.run(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise Failure(f"{what or cmd}: no end after {timeout:.0f} s\n{tail(exc.output)}") from None
    if check and proc.returncode:
        raise Failure(f"{what or cmd}: exit status {proc.returncode}\n{tail(proc.stdout)}")
    return proc


def tail(text: str | bytes | None, lines: int = 25) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-lines:])


def prerequisites() -> None:
    """Install podman & co. with apt-get when missing (as root); Skip when that is impossible."""
    if not (missing := [p for p in PREREQS if not shutil.which(p)]):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Skip(f"{', '.join(missing)} missing, and no apt-get as root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", *PREREQS]
    if subprocess.run(install, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise Skip(f"apt-get install {' '.join(PREREQS)} failed:\n{tail(proc.stdout + proc.stderr, 8)}")


def containers_conf(folder: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1048576 if hard == resource.RLIM_INFINITY else hard
    conf = folder / "containers.conf"
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={hard}:{hard}", "nproc=32768:32768"]\n\n'
                    '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)


def probe() -> None:
    """Skip unless podman runs a container here: an image of the host's /bin/true and its libraries."""
    true = os.path.realpath(shutil.which("true") or "/bin/true")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in [true, *re.findall(r"(/\S+) \(0x", sh(["ldd", true], check=False).stdout)]:
            tar.add(os.path.realpath(path), arcname=path.lstrip("/"))
    tag, what = "localhost/atlas-probe:latest", ""
    try:
        for what, cmd, data in (("import an image", ["podman", "import", "-", tag], buf.getvalue()),
                                ("run a container", ["podman", "run", "--rm", tag, true], None)):
            proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
            if proc.returncode:
                raise Skip(f"podman cannot {what} here:\n{tail(proc.stdout + proc.stderr, 8)}")
    except subprocess.TimeoutExpired:
        raise Skip(f"podman did not {what} within 120 s") from None
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def mirror() -> str:
    """The Debian mirror apt uses here (not the security one)."""
    files = [*sorted(Path("/etc/apt").glob("sources.list*")), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    urls = [u for f in files if f.is_file() for u in re.findall(r"(https?://\S+/debian)/?(?:\s|$)", f.read_text())]
    return urls[0] if urls else "http://deb.debian.org/debian"


def base_image(work: Path) -> bool:
    """Make the base image (debootstrap + python3 venv at /usr/local) unless it exists; True when made."""
    if subprocess.run(["podman", "image", "exists", BASE_ALIAS]).returncode == 0:
        return False
    if subprocess.run(["podman", "image", "exists", BASE]).returncode:
        url, rootfs = mirror(), work / "rootfs"
        sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), url], timeout=1800, what="debootstrap")
        shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        # as the official image: bookworm, its updates and security updates (Debian's chromium is in the last)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {url}\nSuites: bookworm bookworm-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {url}-security\nSuites: bookworm-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        # as the official slim image: apt keeps no .deb files, dpkg installs no docs, man pages or locales
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(
            'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
            'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
            'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\nAcquire::Languages "none";\n')
        (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text("".join(
            f"path-exclude /usr/share/{d}/*\n" for d in ("doc", "man", "info", "groff", "locale", "lintian"))
            + "path-include /usr/share/doc/*/copyright\n")
        sh(["mount", "-t", "proc", "proc", str(rootfs / "proc")], what="mount /proc in the chroot")
        try:
            inside = ("export DEBIAN_FRONTEND=noninteractive && apt-get update && apt-get install -y "
                      f"--no-install-recommends {BASE_PACKAGES} && python3 -m venv /usr/local && "
                      "/usr/local/bin/pip --version && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/man/* "
                      "/usr/share/info/* /usr/share/locale/* && find /usr/share/doc -type f ! -name copyright -delete")
            sh(["chroot", str(rootfs), "/bin/sh", "-c", inside], timeout=1800, what="python3 in the chroot")
        finally:
            sh(["umount", str(rootfs / "proc")], what="umount the chroot's /proc")
        (rootfs / "etc/resolv.conf").unlink()  # podman writes its own
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh(["podman", "import", "--change", f"ENV {PATH_ENV}", "--change", "ENV LANG=C.UTF-8",
            "-", BASE], stdin=tar.stdout, what="podman import of the base")
        if tar.wait():
            raise Failure(f"tar of {rootfs} failed")
        shutil.rmtree(rootfs)
    sh(["podman", "tag", BASE, BASE_ALIAS])
    return True


def pip_mounts(work: Path) -> list[str]:
    """``-v`` options: a pip.conf reproducing the host's effective pip config, and what it names."""
    listing = sh([sys.executable, "-m", "pip", "config", "list"], what="pip config list").stdout
    conf: dict[str, str] = {}
    for key, value in re.findall(r"^(?::env:|global|install)\.([\w-]+)='(.*)'$", listing, re.M):
        conf.setdefault(key, value)  # the environment's values come first and win, as in pip
    for key in ("disable-pip-version-check", "default-timeout"):  # the Dockerfile sets the first
        conf.pop(key, None)
    conf |= {"timeout": "15", "retries": "1"}  # an unreachable index (PyTorch's) costs seconds, not minutes
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
    (work / "pip.conf").write_text(text)
    print("    generated /etc/pip.conf:\n" + tail(text))
    paths = conf.get("find-links", "").split()
    for url in (conf.get("index-url", "") + " " + conf.get("extra-index-url", "")).split():
        if url.startswith("file://"):
            paths.append(str(Path(url[len("file://"):]).parent))  # its pages link to ../../files
    if conf.get("constraint"):
        paths.append(str(Path(conf["constraint"]).parent))
    mounts = ["-v", f"{work / 'pip.conf'}:/etc/pip.conf:ro"]
    for path in dict.fromkeys([*paths, conf.get("cert", "")]):  # the CA bundle at the path the conf names
        if path and os.path.exists(path):
            mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


def build(work: Path) -> str:
    cmd = ["podman", "build", "--format", "docker", "--pull=never", *pip_mounts(work), "-t", IMAGE, "."]
    proc = sh(cmd, timeout=3600, cwd=ROOT, check=False)
    LOG.write_text(proc.stdout)
    print(f"    build log: {LOG}")
    if proc.returncode:
        raise Failure(f"podman build: exit status {proc.returncode}\n{tail(proc.stdout, 40)}")
    wheel = re.search(r"Processing (\S*torch-[^\s/]*\.whl)", proc.stdout)  # absent when the layer came from cache
    print(f"    torch installed from: {wheel.group(1) if wheel else 'a cached layer (see an earlier build log)'}")
    probe_py = ("import importlib.metadata as m; print(m.version('torch'), *sorted({d.metadata['Name'] for d in "
                "m.distributions() if d.metadata['Name'].lower().startswith('nvidia')}))")
    torch, *cuda = in_image(f'python -c "{probe_py}"').split()
    if cuda or not torch.endswith("+cpu"):
        raise Failure(f"the image holds torch {torch}, CUDA packages: {cuda or 'none'} (want +cpu, none)")
    print(f"    torch in the image: {torch}, no CUDA packages")
    return torch


def in_image(script: str) -> str:
    """Run ``script`` in a throw-away container of the image as root; its output."""
    return sh(["podman", "run", "--rm", "--no-healthcheck", "--user", "0", "--entrypoint", "sh", IMAGE, "-c", script],
              what=f"in the image: {script[:60]}").stdout


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


async def protocol_checks(url: str, check) -> None:
    from bench.memory_pressure import adapter_zip
    from bench.st_protocol import Session

    s = await Session.open(url)
    try:
        for path in PAGES:
            try:
                run = await s.visit(path, timeout=180)
                bad = run.exceptions or (["page not found"] if run.page_not_found else [])
                check(f"page /{path}", not bad, "; ".join(bad) or f"{run.elements} elements, {run.seconds:.1f} s")
            except Exception as exc:
                check(f"page /{path}", False, f"{type(exc).__name__}: {exc}")
        try:
            await s.visit("")
            run = await s.upload([("check-adapter.zip", adapter_zip(seed=1, mb=1))])
            ok = "loaded check-adapter" in run.texts and not run.exceptions
            check("upload", ok, "; ".join(run.exceptions) or ("loaded check-adapter" if ok else f"texts: {run.texts}"))
        except Exception as exc:
            check("upload", False, f"{type(exc).__name__}: {exc}")
    finally:
        await s.close()


def browser_check(url: str) -> str:
    """/distances drawn in headless Debian chromium; '' when fine, else what went wrong."""
    from playwright.sync_api import sync_playwright

    from bench.browser_latency import ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(url + "/distances")
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length > 0", timeout=180_000)
            page.wait_for_function("() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
                                   " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }",
                                   timeout=180_000)
            errors = page.locator('[data-testid="stException"]').all_inner_texts()
            return "stException: " + errors[0][:200] if errors else ""
        finally:
            browser.close()


def run_checks(report: dict) -> None:
    checks = report["checks"]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # bench/ for the protocol client and chromium's arguments

    def check(name: str, ok: bool, why: str) -> None:
        checks[name] = {"ok": bool(ok), "why": why}
        print(f"    {'PASS' if ok else 'FAIL'} {name}: {why}")

    subprocess.run(["podman", "rm", "-f", NAME], capture_output=True)
    port = free_port()
    t0 = time.perf_counter()
    sh(["podman", "run", "-d", "--name", NAME, "-p", f"127.0.0.1:{port}:8501", IMAGE], what="podman run")
    url = f"http://127.0.0.1:{port}"
    try:
        healthy = None
        while healthy is None and time.perf_counter() - t0 < 60:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=5) as r:
                    healthy = time.perf_counter() - t0 if r.status == 200 else None
            except OSError:
                time.sleep(0.5)
        report["seconds"]["start_to_health"] = healthy
        if healthy is None:
            logs = sh(["podman", "logs", "--tail", "20", NAME], check=False).stdout
            return check("health 200 within 60 s", False, "no 200 in 60 s; the server's log:\n" + tail(logs))
        check("health 200 within 60 s", True, f"{healthy:.1f} s from podman run")
        proc = sh(["podman", "healthcheck", "run", NAME], check=False, timeout=60)
        check("HEALTHCHECK", proc.returncode == 0, proc.stdout.strip() or "healthy")
        asyncio.run(protocol_checks(url, check))
        try:
            problem = browser_check(url)
            check("chromium /distances", not problem, problem or "a plotly figure, no stException")
        except Exception as exc:
            check("chromium /distances", False, f"{type(exc).__name__}: {str(exc)[:300]}")
        for name, cmd, want in (("uid 1000", "id -u", "1000"), ("ADAPTER_ATLAS_DEMO=1", "printenv ADAPTER_ATLAS_DEMO", "1")):
            got = sh(["podman", "exec", NAME, *cmd.split()], check=False).stdout.strip()
            check(name, got == want, f"{cmd}: {got!r}")
        t1 = time.perf_counter()
        proc = sh(["podman", "stop", "-t", "20", NAME], check=False, timeout=60)
        stop = report["seconds"]["stop"] = time.perf_counter() - t1
        code = sh(["podman", "inspect", "--format", "{{.State.ExitCode}}", NAME], check=False).stdout.strip()
        check("stop within 20 s", proc.returncode == 0 and stop < 19,
              f"{stop:.1f} s, exit code {code}" + ("" if proc.returncode == 0 else "\n" + tail(proc.stdout)))
    finally:
        subprocess.run(["podman", "rm", "-f", NAME], capture_output=True)


def sizes(report: dict) -> None:
    report["image_bytes"] = int(sh(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]).stdout.strip())
    hist = sh(["podman", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE]).stdout
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}  # podman 4.3 prints sizes only this way
    report["layers"] = [{"bytes": int(float(n) * units[u]), "step": " ".join(step.split())[:160]}
                        for n, u, step in re.findall(r"^([\d.]+)\s*([kMGT]?B)\t(.*)$", hist, re.M) if float(n) > 0]
    du = in_image("du -sm /usr/local/lib/python3*/site-packages/* | sort -n | tail -15; du -sm "
                  "/usr/local/lib/python3*/site-packages /usr/lib/chromium /usr/lib/x86_64-linux-gnu /usr/share /var/cache /app")
    report["du_mb"] = {path: int(mb) for mb, path in re.findall(r"^(\d+)\s+(\S+)$", du, re.M)}


def summary(report: dict) -> None:
    print("\n== summary ==")
    for step, s in report["seconds"].items():
        print(f"  {step:<24} {'-' if s is None else f'{s:8.1f} s'}")
    if "image_bytes" in report:
        print(f"  {'image size':<24} {report['image_bytes'] / 1e6:8.0f} MB")
        for layer in sorted(report.get("layers", []), key=lambda x: -x["bytes"])[:5]:
            print(f"    layer {layer['bytes'] / 1e6:8.0f} MB  {layer['step'][:90]}")
        for path, mb in sorted(report.get("du_mb", {}).items(), key=lambda x: -x[1])[:16]:
            print(f"    du {mb:8d} MB  {path}")
    for name, c in report["checks"].items():
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {name}: {c['why'].splitlines()[0] if c['why'] else ''}")
    print(f"  RESULT: {'PASSED' if report['passed'] else 'FAILED'}{' - ' + report['error'] if report.get('error') else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the app image (the base image is always kept)")
    ap.add_argument("--json", type=Path, help="write every figure (seconds, sizes, checks) to this file")
    args = ap.parse_args(argv)
    report: dict = {"seconds": {}, "checks": {}, "passed": False}

    def step(name: str, fn, *a):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            return fn(*a)
        finally:
            report["seconds"][name] = time.perf_counter() - t0
            print(f"   {name}: {report['seconds'][name]:.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="image-check-") as tmp:
        work = Path(tmp)
        try:
            step("prerequisites", prerequisites)
            containers_conf(work)
            step("probe", probe)
        except Skip as exc:
            print(f"SKIPPED: {exc}")
            return 0
        try:
            report["base_made"] = step("base", base_image, work)
            report["torch"] = step("build", build, work)
            step("run+checks", run_checks, report)
            step("sizes", sizes, report)
            report["passed"] = bool(report["checks"]) and all(c["ok"] for c in report["checks"].values())
        except Failure as exc:
            report["error"] = str(exc).splitlines()[0]
            print(f"FAILED: {exc}", file=sys.stderr)
        finally:  # run_checks removes the container
            if not args.keep:
                subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True)
    summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
