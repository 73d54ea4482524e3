"""Figure files: HTML opens offline (plotly.js embedded), SVG and PDF through kaleido and the system chromium."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from ui.downloads import chromium_path, figure_bytes


def _fig() -> go.Figure:
    return go.Figure(go.Heatmap(z=[[0.0, 1.0], [1.0, 0.0]], x=["a", "b"], y=["a", "b"]),
                     layout=dict(title="distance", xaxis_title="adapter", width=500, height=400))


def test_html_embeds_plotly_js():
    html = figure_bytes(_fig(), "html").decode()
    assert '<script src="https://cdn' not in html and 'src="http' not in html  # no script fetched at open
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html  # plotly.js itself is in the file


@pytest.mark.slow
@pytest.mark.browser  # kaleido drives the system chromium
def test_svg_and_pdf_export():
    if chromium_path() is None:
        pytest.skip("no chromium for kaleido")
    svg = figure_bytes(_fig(), "svg")
    assert svg.lstrip().startswith(b"<svg") and b"distance" in svg
    pdf = figure_bytes(_fig(), "pdf")
    assert pdf.startswith(b"%PDF")
    with pytest.raises(ValueError, match="unknown figure format"):
        figure_bytes(_fig(), "gif")
