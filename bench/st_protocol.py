"""A Streamlit client without a browser: the websocket protocol a browser tab speaks, for load tests.

A browser tab talks to a Streamlit server over one websocket (``/_stcore/stream``): it sends
``BackMsg`` protobufs (``rerun_script`` with the page's name or script hash) and receives
``ForwardMsg`` protobufs (``new_session``, ``navigation``, the page's ``delta`` elements,
``script_finished``). :class:`Session` sends exactly those messages and reads every reply, so the
server does all the work a visitor causes (the script run, every element serialised and sent), while
nothing is rendered here: on a hosted demo the rendering happens on the visitors' machines, not the
server's. A first visit also fetches ``index.html`` and the static files it references over HTTP,
as a browser without a cache does.

What it does not do: it sends no widget changes other than a file uploader's (:meth:`Session.upload`: the
browser's three steps, file URLs over the websocket, an HTTP PUT per file, the widget's new state in a rerun),
follows no ``auto_rerun`` timers and fetches no ``/media`` files;
it declares no cached messages, so the server sends every element in full (a browser's message cache
would let it send references instead: this client is the heavier visitor).

Used by ``bench/soak.py --client protocol`` and ``tests/test_soak_protocol.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

FINISHED = ForwardMsg.ScriptFinishedStatus.FINISHED_SUCCESSFULLY
EARLY = ForwardMsg.ScriptFinishedStatus.FINISHED_EARLY_FOR_RERUN
COMPILE_ERROR = ForwardMsg.ScriptFinishedStatus.FINISHED_WITH_COMPILE_ERROR


def fetch_static(url: str, timeout: float = 30.0, assets: bool = True, connections: int = 6) -> int:
    """GET ``url`` (a page of the app) and, with ``assets``, every script and stylesheet its HTML
    references, as a browser without a cache does: gzip accepted (and undone), the files over
    ``connections`` kept-alive connections in parallel (a browser's six per host); bytes received.

    (Fetched one after the other, 60 files wait behind a busy server one at a time: 6 s under the soak's
    load where a browser takes a fraction. Streamlit compresses the HTML of a page's path, never
    ``/static``.)
    """
    import gzip
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    parts = urllib.parse.urlsplit(url)

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def get(conn: http.client.HTTPConnection, path: str) -> tuple[bytes, int]:
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: HTTP {response.status}")
        return (gzip.decompress(body) if response.getheader("Content-Encoding") == "gzip" else body), len(body)

    first = connect()
    try:
        html, total = get(first, parts.path or "/")
        refs = ["/" + r.decode() for r in re.findall(rb'(?:src|href)="\.?/?(static/[^"]+\.(?:js|css))"', html)]
        if not assets or not refs:
            return total
        lanes = min(connections, len(refs))

        def lane(k: int) -> int:
            conn = first if k == 0 else connect()
            try:
                return sum(get(conn, ref)[1] for ref in refs[k::lanes])
            finally:
                if k:
                    conn.close()

        with ThreadPoolExecutor(lanes) as pool:
            total += sum(pool.map(lane, range(lanes)))
    finally:
        first.close()
    return total


@dataclass
class Run:
    """One script run as the client saw it: seconds from the request to ``script_finished``."""

    seconds: float
    elements: int = 0
    bytes: int = 0
    exceptions: list[str] = field(default_factory=list)
    page_not_found: bool = False
    #: the text of every markdown, caption and alert element drawn (the sidebar's messages among them)
    texts: list[str] = field(default_factory=list)


class Session:
    """One visitor: a websocket session with the server at ``url`` (``http://host:port``).

    ``await Session.open(url)``, then ``await s.visit("distances")`` (a shared link opened: by the
    page's URL path, ``""`` for the default page) or ``await s.switch("distances")`` (a click on the
    page's link in the sidebar: by its script hash, as the browser sends it), and ``await s.close()``.
    """

    def __init__(self, ws, url: str):
        self.ws, self.url = ws, url
        self.pages: dict[str, str] = {}  # url path -> page script hash, from the navigation message
        self.session_id: str | None = None
        self.uploaders: dict[str, str] = {}  # file uploader label -> widget id, from the last run's elements
        self.page_hash = ""  # the page the last run drew
        self.xsrf: str | None = None

    @classmethod
    async def open(cls, url: str, timeout: float = 30.0) -> Session:
        import websockets

        ws_url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/_stcore/stream"
        ws = await websockets.connect(ws_url, subprotocols=["streamlit"], max_size=None, open_timeout=timeout,
                                      ping_interval=None)
        return cls(ws, url)

    async def _rerun(self, page_name: str = "", page_script_hash: str = "", timeout: float = 60.0,
                     widgets=None) -> Run:
        msg = BackMsg()
        state = msg.rerun_script
        state.query_string = ""
        state.page_name = page_name
        state.page_script_hash = page_script_hash
        if widgets is not None:
            state.widget_states.widgets.extend(widgets)
        state.context_info.timezone = "UTC"
        state.context_info.locale = "en-US"
        state.context_info.url = f"{self.url}/{page_name}"
        t0 = time.perf_counter()
        await self.ws.send(msg.SerializeToString())
        run = Run(0.0)
        deadline = t0 + timeout
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout=max(0.01, deadline - time.perf_counter()))
            run.bytes += len(data)
            fwd = ForwardMsg()
            fwd.ParseFromString(data)
            kind = fwd.WhichOneof("type")
            if kind == "new_session":
                self.session_id = fwd.new_session.initialize.session_id or self.session_id
                self.page_hash = fwd.new_session.page_script_hash or self.page_hash
            elif kind == "navigation":
                self.pages = {p.url_pathname: p.page_script_hash for p in fwd.navigation.app_pages}
            elif kind == "page_not_found":
                run.page_not_found = True
            elif kind == "delta":
                run.elements += 1
                if fwd.delta.WhichOneof("type") == "new_element":
                    element = fwd.delta.new_element
                    what = element.WhichOneof("type")
                    if what == "exception":
                        exc = element.exception
                        run.exceptions.append(f"{exc.type}: {exc.message}"[:300])
                    elif what == "file_uploader":
                        self.uploaders[element.file_uploader.label] = element.file_uploader.id
                    elif what in ("markdown", "alert"):
                        run.texts.append(getattr(element, what).body)
            elif kind == "script_finished":
                if fwd.script_finished == EARLY:  # st.rerun / st.switch_page: the next run follows
                    continue
                if fwd.script_finished == COMPILE_ERROR:
                    run.exceptions.append("the script did not compile")
                if fwd.script_finished in (FINISHED, COMPILE_ERROR):
                    run.seconds = time.perf_counter() - t0
                    return run

    async def visit(self, path: str, timeout: float = 60.0) -> Run:
        """Open the page at URL path ``path`` in this session (a shared link), until its script finished."""
        return await self._rerun(page_name=path, timeout=timeout)

    async def switch(self, path: str, timeout: float = 60.0) -> Run:
        """Go to page ``path`` by its sidebar link (its script hash, learned from the last navigation message)."""
        if path not in self.pages:
            raise KeyError(f"no page {path!r} in the app's navigation ({sorted(self.pages)})")
        return await self._rerun(page_script_hash=self.pages[path], timeout=timeout)

    def _xsrf_token(self) -> str | None:
        """The XSRF cookie a browser gets from the server (the health check sets it; sent back as ``X-Xsrftoken``)."""
        if self.xsrf is None:
            with urllib.request.urlopen(self.url + "/_stcore/health", timeout=30) as response:
                for header in response.headers.get_all("Set-Cookie") or []:
                    m = re.match(r"_streamlit_xsrf=([^;]+)", header)
                    if m:
                        self.xsrf = m.group(1)
        return self.xsrf

    def _put(self, upload_url: str, name: str, data: bytes) -> int:
        """PUT one file as the browser does (multipart form, one ``UploadedFile`` field); the HTTP status."""
        import uuid

        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"UploadedFile\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        url = upload_url if upload_url.startswith("http") else self.url + upload_url
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        token = self._xsrf_token()
        if token:
            headers["X-Xsrftoken"] = token
            headers["Cookie"] = f"_streamlit_xsrf={token}"
        request = urllib.request.Request(url, data=body, method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    async def upload(self, files: list[tuple[str, bytes]], label_startswith: str = "Upload",
                     timeout: float = 120.0) -> Run:
        """Put ``files`` (name, bytes) into the file uploader whose label starts with ``label_startswith`` on the
        page drawn last, as a browser does, and return the rerun that follows (its ``texts`` hold the messages).
        A file the server refuses at the HTTP step (413: over ``server.maxUploadSize``) is named in
        ``run.exceptions`` and left out of the widget's state."""
        from streamlit.proto.Common_pb2 import UploadedFileInfo
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        label = next((k for k in self.uploaders if k.startswith(label_startswith)), None)
        if label is None:
            raise KeyError(f"no file uploader labelled {label_startswith!r}... on this page ({sorted(self.uploaders)})")
        import uuid

        request_id = uuid.uuid4().hex
        msg = BackMsg()
        msg.file_urls_request.request_id = request_id
        msg.file_urls_request.file_names.extend(name for name, _ in files)
        msg.file_urls_request.session_id = self.session_id or ""
        await self.ws.send(msg.SerializeToString())
        deadline = time.perf_counter() + timeout
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout=max(0.01, deadline - time.perf_counter()))
            fwd = ForwardMsg()
            fwd.ParseFromString(data)
            if fwd.WhichOneof("type") == "file_urls_response" and fwd.file_urls_response.response_id == request_id:
                break
        if fwd.file_urls_response.error_msg:
            raise OSError(f"file URLs refused: {fwd.file_urls_response.error_msg}")
        widget = WidgetState(id=self.uploaders[label])
        refused = []
        loop = asyncio.get_running_loop()
        for (name, payload), urls in zip(files, fwd.file_urls_response.file_urls):
            status = await loop.run_in_executor(None, self._put, urls.upload_url, name, payload)
            if status not in (200, 204):
                refused.append(f"{name}: HTTP {status}")
                continue
            info = UploadedFileInfo(file_id=urls.file_id, name=name, size=len(payload))
            info.file_urls.CopyFrom(urls)
            widget.file_uploader_state_value.uploaded_file_info.append(info)
        run = await self._rerun(page_script_hash=self.page_hash, timeout=timeout, widgets=[widget])
        run.exceptions.extend(refused)
        return run

    async def close(self) -> None:
        await self.ws.close()
