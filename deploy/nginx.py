"""nginx in front of the dashboard: Streamlit's own files from disk, everything else to the server.

A first visit fetches the page's HTML and about 60 scripts and stylesheets (2.1 MB). Streamlit serves
them from the same Python process, on the same event loop, as every session's websocket and script
runs: about 2 ms of that process's CPU per file however small (measured with
``bench/soak.py``'s protocol client: a 63-byte file costs 2.2 ms, the health check 0.4 ms), about
0.1 s per first visit, which eight simultaneous visitors queue for. The files are the ``streamlit``
package's own, read-only and content-hashed, so a reverse proxy can serve them itself: this module
writes an nginx configuration that

* serves ``/static/`` from the installed package's ``streamlit/static/static/`` (gzip on the fly,
  a year of browser cache: the names carry the content hash, as Streamlit's own headers say);
* passes the websocket (``/_stcore/stream``, with the Upgrade headers and no read timeout) and every
  other path (pages, health, uploads, media, downloads) to the Streamlit server.

``python -m deploy.nginx --listen 8080 --upstream 127.0.0.1:8501 --prefix DIR`` writes
``DIR/nginx.conf`` and prints the command that runs it (``nginx -p DIR -c nginx.conf``); run it as
any user (every path nginx writes is under ``DIR``). :func:`running` starts one for a test or a bench.
``docs/deploy.md`` ("Behind nginx") has the measured effect.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from deploy import served

#: the header nginx adds to the files it serves itself (tests check who answered)
SERVED_BY = "X-Served-By"

TEMPLATE = """\
# Written by deploy/nginx.py: nginx serves Streamlit's static files, the rest goes to Streamlit.
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    types {{
        text/html html;
        text/css css;
        application/javascript js mjs;
        application/json json map;
        image/svg+xml svg;
        image/png png;
        image/x-icon ico;
        font/woff woff;
        font/woff2 woff2;
        font/ttf ttf;
        application/wasm wasm;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_max_body_size {max_body_mb}m;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    gzip on;
    gzip_comp_level 5;
    gzip_min_length 1024;
    gzip_types text/css application/javascript application/json image/svg+xml;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream streamlit {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen {listen};

        # Streamlit's own scripts, stylesheets and fonts: content-hashed names, read-only files.
        location /static/ {{
            alias {static}/;
            add_header Cache-Control "public, max-age=31536000, immutable";
            add_header {served_by} nginx;
        }}

        location /_stcore/stream {{
            proxy_pass http://streamlit;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1d;
            proxy_send_timeout 1d;
        }}

        location / {{
            proxy_pass http://streamlit;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 10m;
        }}
    }}
}}
"""


def static_dir() -> Path:
    """The folder Streamlit serves at ``/static/``: ``<streamlit package>/static/static``."""
    import streamlit

    return Path(streamlit.__file__).parent / "static" / "static"


def config(prefix: Path | str, listen: int | str = 8080, upstream: str = "127.0.0.1:8501",
           static: Path | str | None = None, max_body_mb: int = 1024, user: str | None = None) -> str:
    """The nginx configuration (see the module docstring). ``listen``: a port or ``address:port``;
    ``upstream``: the Streamlit server's ``host:port``; ``max_body_mb``: uploads through the proxy (keep
    it at Streamlit's ``server.maxUploadSize``, which the server checks again); ``user``: the account nginx's
    workers run as when nginx is started as root (nginx's default is ``nobody``, which must be able to read
    the static folder: a virtual environment in a private folder is not readable by it)."""
    static = Path(static) if static is not None else static_dir()
    if not (static / "js").is_dir():
        raise FileNotFoundError(f"{static} is not Streamlit's static folder (it has no js/ folder)")
    return TEMPLATE.format(prefix=Path(prefix).resolve(), listen=listen, upstream=upstream,
                           static=static.resolve(), served_by=SERVED_BY, max_body_mb=int(max_body_mb),
                           user=f"user {user};\n" if user else "")


def write(prefix: Path | str, **kwargs) -> Path:
    """Write ``prefix/nginx.conf`` (and the folders it names); returns its path."""
    prefix = Path(prefix).resolve()
    text = config(prefix, **kwargs)  # a wrong static folder fails before anything is written
    for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def nginx() -> str | None:
    """The nginx executable (``/usr/sbin`` is searched too: Debian puts it there), or ``None``."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


@contextmanager
def running(prefix: Path | str, upstream: str, timeout: float = 20.0):
    """nginx in front of ``upstream`` on a free local port, for as long as the block runs; yields its URL."""
    exe = nginx()
    if exe is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as root, nginx would run its workers as nobody, who may not read the static files: run them as root
    conf = write(prefix, listen=f"127.0.0.1:{port}", upstream=upstream, user="root" if os.geteuid() == 0 else None)
    proc = subprocess.Popen([exe, "-p", str(conf.parent), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = conf.parent / "error.log"
    with served(f"http://127.0.0.1:{port}", proc, timeout, "nginx", interval=0.1,
                detail=lambda: f": {log.read_text()[-2000:]}" if log.exists() else "") as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.nginx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="8080", help="port (or address:port) nginx listens on (default 8080)")
    ap.add_argument("--upstream", default="127.0.0.1:8501", help="the Streamlit server (default 127.0.0.1:8501)")
    ap.add_argument("--prefix", default="nginx", help="folder for nginx.conf, its pid, log and temp files")
    ap.add_argument("--max-upload-mb", type=int, default=1024, help="largest request body (default 1024)")
    ap.add_argument("--static", default=None,
                    help="Streamlit's static folder (default: this Python's streamlit/static/static; for a server "
                         "in a container, a copy of the container's, made with docker cp)")
    ap.add_argument("--user", default=None,
                    help="account of nginx's workers when it is started as root (default nginx's: nobody)")
    args = ap.parse_args(argv)
    try:
        conf = write(args.prefix, listen=args.listen, upstream=args.upstream, max_body_mb=args.max_upload_mb,
                     static=args.static, user=args.user)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {conf}\nrun:  nginx -p {conf.parent} -c {conf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
