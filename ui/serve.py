"""``python -m ui.serve [streamlit options]``: ``streamlit run app.py`` with the heavy imports started at once.

Streamlit runs ``app.py`` only when a visitor connects, so a freshly started server (a container start, a demo
that slept) imported PyTorch, pandas, Plotly and the library during its first visitor's script run: about 2 s
of the first figure. Here a thread imports them (``ui.loading.preload``) while Streamlit's server starts, and the
first visitor's run finds them loaded (or waits for the rest, with the loading page showing what loads). The
Dockerfile's ``CMD`` starts the server this way; ``streamlit run app.py`` still works (imports on first visit).
Options after ``ui.serve`` go to ``streamlit run`` (``--server.port 8502``...).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app.py"


def main(argv: list[str] | None = None) -> None:
    from ui import loading

    threading.Thread(target=loading.preload, name="atlas-preload", daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *(sys.argv[1:] if argv is None else argv)]
    cli.main()  # click: exits the process when the server stops


if __name__ == "__main__":
    main()
