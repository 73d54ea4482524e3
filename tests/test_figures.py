"""Figure builders and view slicing of the dashboard (pure functions, no Streamlit)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ui import figures, views


def _names(n):
    return [f"task{i}" for i in range(n)]


def test_matrix_heatmap_carries_values_names_and_hover():
    m = np.arange(9.0).reshape(3, 3)
    fig = figures.matrix_heatmap(m, _names(3), title="T", value_label="d_G (radians)", detail="kind: v")
    trace = fig.data[0]
    np.testing.assert_array_equal(np.asarray(trace.z), m)
    assert list(trace.x) == _names(3) and list(trace.y) == _names(3)
    assert trace.customdata[0][2][1] == "task2"  # hover names the column adapter of cell (0, 2)
    assert "kind: v" in trace.hovertemplate and "d_G (radians)" in trace.hovertemplate
    assert fig.layout.title.text == "T"
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top, like the printed matrix


def test_side_by_side_shares_one_colour_scale():
    q, v = np.full((2, 2), 0.2), np.full((2, 2), 0.9)
    fig = figures.side_by_side_heatmaps({"q": q, "v": v}, _names(2), title="Q vs V", value_label="cos")
    assert len(fig.data) == 2
    assert {t.zmin for t in fig.data} == {0.2} and {t.zmax for t in fig.data} == {0.9}

    assert [t.showscale for t in fig.data] == [False, True]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["q projections", "v projections"]


def test_colour_range_ignores_the_zero_diagonal():
    m = np.array([[0.0, 0.98, 0.99], [0.98, 0.0, 1.01], [0.99, 1.01, 0.0]])
    fig = figures.matrix_heatmap(m, _names(3), title="T", value_label="cos")
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.98, 1.01)
    assert figures.off_diagonal_range(np.full((2, 2), np.nan)) == (None, None)


def test_embedding_scatter_labels_points():
    coords = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    fig = figures.embedding_scatter(coords, _names(3), title="map", method="PCA")
    assert list(fig.data[0].text) == _names(3)
    np.testing.assert_array_equal(np.asarray(fig.data[0].x), coords[:, 0])
    assert "PCA" in fig.layout.xaxis.title.text


def test_layer_lines_one_trace_per_series_and_facet():
    frame = pd.DataFrame(
        {
            "series": ["a ↔ b"] * 4 + ["a ↔ c"] * 4,
            "layer": [0, 1, 0, 1] * 2,
            "value": np.arange(8.0),
            "kind": ["q", "q", "v", "v"] * 2,
        }
    )
    fig = figures.layer_lines(frame, title="t", value_label="cos", facet="kind")
    assert len(fig.data) == 4
    assert sum(bool(t.showlegend) for t in fig.data) == 2
    assert all("layer" in t.hovertemplate for t in fig.data)


def test_norm_heatmap_grid_matches_table():
    frame = pd.DataFrame(
        {"layer": [0, 0, 1, 1], "kind": ["q", "v", "q", "v"], "fro_norm": [1.0, 2.0, 3.0, 4.0],
         "m": 8, "n": 8, "rank": 4}
    )
    fig = figures.norm_heatmap(frame, adapter="x", title="norms")
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), [[1.0, 2.0], [3.0, 4.0]])
    assert list(fig.data[0].x) == ["q", "v"]
    assert "adapter: %{customdata[0]}" in fig.data[0].hovertemplate


def test_grid_curves_is_metrics_by_kinds():
    rows = []
    for direction in ("a → b", "b → a"):
        for kind in ("q", "v"):
            for layer in range(3):
                rows.append({"direction": direction, "kind": kind, "layer": layer, "l1": layer, "rec": 0.5})
    fig = figures.grid_curves(pd.DataFrame(rows), title="fig2", rows=["l1", "rec"], cols=["q", "v"],
                              row_labels=views.INCLUSION_METRICS)
    assert len(fig.data) == 2 * 2 * 2
    assert len(fig.layout.annotations) == 4


def test_plotly_config_names_png():
    cfg = figures.plotly_config("distance_cosine")
    assert cfg["toImageButtonOptions"] == {"format": "png", "filename": "distance_cosine", "scale": 2}


@pytest.mark.parametrize(
    "choice, spec",
    [
        (views.LayerChoice("all"), "all"),
        (views.LayerChoice("one", layer=3), "3"),
        (views.LayerChoice("range", start=4, stop=1), "1-4"),
        (views.LayerChoice("last", k=2), "last:2"),
    ],
)
def test_layer_choice_spec(choice, spec):
    assert choice.spec == spec


def test_map_labels_do_not_overlap_and_no_rounding_noise_ticks():
    from ui.figures import embedding_scatter, label_positions

    coords = np.array([[0.0, 0.0], [0.02, 0.0], [0.04, 0.01], [1.0, 1.0]])
    names = ["sentiment_movies", "sentiment_movies_seed1", "sentiment_products", "nli"]
    spots = label_positions(coords, names, (-0.3, 1.3), (-0.2, 1.2))
    assert len(set(spots[:3])) == 3  # three crowded points: three different sides
    fig = embedding_scatter(np.array([[1.0, 1.1e-16], [-1.0, -1.1e-16]]), ["a", "b"], title="t", method="PCA")
    assert list(fig.data[0].y) == [0.0, 0.0]
    lo, hi = fig.layout.yaxis.range
    assert hi - lo > 0.3  # a readable axis, not a 1e-16 one


def test_long_names_are_shortened_on_matrix_axes_not_in_hover():
    from ui.figures import matrix_heatmap, short_name

    long = "MatthewZhang473__LoRA_Qwen0.5B__r6_alpha32"
    assert short_name(long) == "MatthewZha…_r6_alpha32" and len(short_name(long)) == 22
    fig = matrix_heatmap(np.eye(2), ["nli", long], title="t", value_label="v")
    assert list(fig.layout.xaxis.ticktext) == ["nli", short_name(long)]
    assert fig.data[0].customdata[1][1][0] == long  # hover: the full name


@pytest.mark.parametrize("rows, cols, hspace, vspace", [(1, 2, 0.05, 0.3), (2, 2, 0.08, 0.16), (1, 3, 0.1, 0.3)])
def test_grid_lays_out_panels_as_make_subplots(rows, cols, hspace, vspace):
    """The one-shot figure specs place panels and subplot titles exactly where make_subplots would."""
    from plotly.subplots import make_subplots

    titles = [f"t{k}" for k in range(rows * cols)]
    ref = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=hspace,
                        vertical_spacing=vspace).layout
    cells, notes = figures._grid(rows, cols, titles=titles, hspace=hspace, vspace=vspace)
    for cell in cells.values():
        np.testing.assert_allclose(ref[cell["xaxis"]].domain, cell["xdomain"], atol=1e-12)
        np.testing.assert_allclose(ref[cell["yaxis"]].domain, cell["ydomain"], atol=1e-12)
        assert ref[cell["xaxis"]].anchor == cell["y"] and ref[cell["yaxis"]].anchor == cell["x"]
    for mine, theirs in zip(notes, ref.annotations):
        assert mine["text"] == theirs.text
        assert mine["x"] == pytest.approx(theirs.x) and mine["y"] == pytest.approx(theirs.y)


def test_margins_leave_room_for_long_names_and_rotated_ticks():
    names = ["nli", "sentiment_movies_seed1"]
    fig = figures.matrix_heatmap(np.eye(2), names, title="t", value_label="v")
    assert fig.layout.margin.l >= 0.5 * 12 * len("sentiment_movies_seed1")  # the longest tick fits at the left
    assert fig.layout.margin.b > fig.layout.margin.t / 2  # rotated x names need height under the plot
    assert fig.layout.xaxis.automargin and fig.layout.yaxis.automargin  # a wrong estimate still does not clip


def _spec(z):
    return [dict(type="heatmap", z=z, x=["a", "b"], y=["a", "b"])], dict(title=dict(text="T"), height=300)


def test_shared_figure_is_one_object_per_content_with_the_plain_figures_dict():
    import plotly.graph_objects as go

    z = np.array([[0.0, 1.5], [1.5, 0.0]])
    data, layout = _spec(z)
    fig = figures.figure(data, layout)
    assert figures.figure(*_spec(z.copy())) is fig  # same content (a new array): the same object
    assert figures.figure(*_spec(z + 1)) is not fig  # other content: another one
    plain = go.Figure({"data": data, "layout": figures.fit_margins(data, layout)}).to_dict()
    assert fig.to_dict() == plain
    first = fig.to_dict()
    first["layout"]["title"]["text"] = "changed by a caller"  # to_dict hands out copies
    assert fig.to_dict() == plain


def test_shared_figure_refuses_changes_and_copies_are_editable():
    import plotly.graph_objects as go

    fig = figures.figure(*_spec(np.eye(2)))
    for change in (lambda: fig.update_layout(height=10), lambda: fig.update_traces(zmin=0),
                   lambda: fig.update_xaxes(type="log"), lambda: fig.add_trace(go.Scatter(x=[1], y=[1])),
                   lambda: setattr(fig.layout, "height", 10), lambda: setattr(fig, "layout", {}),
                   lambda: setattr(fig.data[0], "zmin", 0.0)):
        with pytest.raises(TypeError, match="shared"):
            change()
    assert fig.layout.height == 300 and fig.data[0].zmin is None
    copy = go.Figure(fig).update_layout(height=10)
    assert copy.layout.height == 10 and fig.to_dict()["layout"]["height"] == 300


def test_shared_figures_are_evicted_beyond_their_byte_budget(monkeypatch):
    from ui import cache

    monkeypatch.setattr(cache, "FIGURES", cache.figure_cache(20_000))
    first = figures.figure(*_spec(np.random.default_rng(0).normal(size=(20, 20))))
    for i in range(1, 30):
        figures.figure(*_spec(np.random.default_rng(i).normal(size=(20, 20))))
    assert cache.FIGURES.currsize == sum(size for _, size in cache.FIGURES.values()) <= 20_000
    assert len(cache.FIGURES) >= 2
    again = figures.figure(*_spec(np.random.default_rng(0).normal(size=(20, 20))))
    assert again is not first and again.to_dict() == first.to_dict()  # rebuilt, same figure


def test_built_runs_a_builder_once_per_distinct_arguments_while_its_figure_is_kept(monkeypatch):
    """The key is the builder's own arguments (bound to its signature, arrays by content), never a list
    written by hand: what the figure depends on, and only that."""
    from cachetools import LRUCache

    from ui import cache

    monkeypatch.setattr(cache, "FIGURES", cache.figure_cache())
    monkeypatch.setattr(cache, "BUILT", LRUCache(maxsize=cache.BUILT_KEYS))
    calls = []

    def bars(values, title, log=False):
        calls.append(title)
        return figures.figure([{"type": "bar", "y": list(values)}], {"title": {"text": title}})

    first = figures.built(bars, np.array([1, 2]), title="one")
    assert figures.built(bars, np.array([1, 2]), "one", log=False) is first and calls == ["one"]  # same arguments
    assert figures.built(bars, np.array([1, 2]), title="one", log=True) is not None and len(calls) == 2
    other = figures.built(bars, np.array([3, 4]), title="one")  # same title, other content: built
    assert other is not first and calls == ["one", "one", "one"]
    assert list(other.data[0].y) == [3, 4] and list(first.data[0].y) == [1, 2]
    frame = pd.DataFrame({"y": [1.0, 2.0]})
    calls.clear()
    figures.built(bars, frame["y"], title="df")
    assert figures.built(bars, frame.copy()["y"], title="df") is not None and calls == ["df"]  # a copy: same content
    cache.FIGURES.clear()  # the figure is gone from figure()'s cache: built again, not a stale reference
    again = figures.built(bars, np.array([1, 2]), title="one")
    assert calls == ["df", "one"] and again.to_dict() == first.to_dict()
    none_calls = []
    assert figures.built(lambda: none_calls.append(1)) is None
    assert figures.built(lambda: none_calls.append(1)) is None and none_calls == [1, 1]  # None not kept


def test_argument_keys_follow_content_not_identity():
    from ui import cache

    def builder(matrix, names, *, title="t", detail=None):
        return None

    m = np.arange(6.0).reshape(2, 3)
    key = cache.argument_key(builder, m, ["a", "b"])
    assert key == cache.argument_key(builder, m.copy(), ["a", "b"], title="t")  # a copy, the default spelled out
    assert key != cache.argument_key(builder, m.T.copy(), ["a", "b"])  # same bytes, other shape
    assert key != cache.argument_key(builder, m, ["a", "b"], detail="x")
    assert key != cache.argument_key(builder, m.astype(np.float32), ["a", "b"])
    big = pd.DataFrame({"sv": [np.arange(3000.0), np.arange(3000.0)]})  # arrays in cells: hashed whole
    changed = big.copy()
    changed.at[1, "sv"] = np.r_[np.arange(1500.0), -1.0, np.arange(1501.0, 3000.0)]
    assert cache.content_hash(big) != cache.content_hash(changed)
    assert cache.content_hash(big) == cache.content_hash(big.copy())


def test_streamlit_draws_a_shared_figure_as_the_plain_one():
    """st.plotly_chart's own conversion (Figure -> dict -> JSON spec) gives the same spec for both."""
    import json

    import plotly.graph_objects as go
    import plotly.io as pio
    import plotly.tools

    data, layout = _spec(np.arange(4.0).reshape(2, 2))
    shared = plotly.tools.return_figure_from_figure_or_data(figures.figure(data, layout), validate_figure=True)
    plain = plotly.tools.return_figure_from_figure_or_data(
        go.Figure({"data": data, "layout": figures.fit_margins(data, layout)}), validate_figure=True)
    assert json.loads(pio.to_json(shared, validate=False)) == json.loads(pio.to_json(plain, validate=False))


def test_fit_margins_leaves_room_for_what_plotly_pushes_into_the_margins():
    """Axis titles at a fixed standoff, no padding, a colour bar's room on the right, a legend below the
    plot inside the bottom margin; margins are only widened, the caller's layout is not changed."""
    heat = [dict(type="heatmap", z=[[0, 1], [1, 0]], colorbar=dict(title=dict(text="d")))]
    layout = dict(height=400, margin=dict(l=50, r=10, t=60, b=40), xaxis=dict(title=dict(text="adapter")),
                  yaxis=dict(title="adapter"), legend=dict(y=-0.2, yanchor="top"))
    fitted = figures.fit_margins(heat, layout)
    assert layout["margin"] == dict(l=50, r=10, t=60, b=40) and "standoff" not in layout["xaxis"]["title"]
    assert fitted["margin"]["pad"] == 0 and fitted["margin"]["r"] == figures.COLORBAR_MARGIN
    assert fitted["xaxis"]["title"] == {"text": "adapter", "standoff": figures.TITLE_STANDOFF}
    assert fitted["yaxis"]["title"] == {"text": "adapter", "standoff": figures.TITLE_STANDOFF}
    assert fitted["margin"]["b"] == 40  # one trace: no legend drawn, nothing below the plot
    # a colour bar placed by the caller (inside the plot) takes no room
    placed = [dict(heat[0], colorbar=dict(x=0.5))]
    assert figures.fit_margins(placed, layout)["margin"]["r"] == 10
    lines = [dict(type="scatter", name=f"pair {k}", y=[0, 1]) for k in range(12)]
    below = figures.fit_margins(lines, layout)["margin"]["b"]
    few = figures.fit_margins(lines[:2], layout)["margin"]["b"]
    # the legend hangs 0.2 plot heights under the plot, then its rows: b >= 0.2 (400 - 60 - b) + rows
    assert few >= 0.2 * (400 - 60 - few) + 22 and below > few + 15  # 12 entries take a second row
    wide = dict(layout, margin=dict(l=50, r=300, t=60, b=250))
    assert figures.fit_margins(lines, wide)["margin"] == dict(l=50, r=300, t=60, b=250, pad=0)


def test_every_builder_goes_through_fit_margins():
    fig = figures.matrix_heatmap(np.array([[0.0, 1.0], [1.0, 0.0]]), ["a", "b"], title="t", value_label="d")
    assert fig.layout.margin.pad == 0 and fig.layout.margin.r == figures.COLORBAR_MARGIN
    assert fig.layout.xaxis.title.standoff == figures.TITLE_STANDOFF
