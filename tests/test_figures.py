"""Paper figures (matplotlib): the depth-study figure and the comparison bar chart, written as valid PNG / PDF /
SVG, reproducible byte for byte, with the numbers they are drawn from."""

import xml.etree.ElementTree as ET

import matplotlib
import pytest

from recbole_reason.figures import BAR_HEIGHT, comparison_figure, depth_figure, save_figure
from recbole_reason.tables import build_tables, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _depth_rows():
    rows = []
    for label, key, trained, points in (("ReaRec K=2", "reason_step", 2, [(0, 0.10), (1, 0.12), (2, 0.15), (3, 0.14)]),
                                        ("LARES T=4", "test_recurrence", 4, [(1, 0.08), (4, 0.13), (8, 0.135)])):
        for depth, value in points:
            rows.append({"label": label, "depth_key": key, "depth": depth, "trained_depth": trained, "split": "test",
                         "metrics": {"ndcg@10": value, "hit@10": 2 * value}})
    return rows


def assert_valid_files(files):
    assert open(files["png"], "rb").read(8) == PNG_MAGIC
    pdf = open(files["pdf"], "rb").read()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    ET.parse(files["svg"])  # well-formed XML


def test_depth_figure_has_a_panel_per_knob_a_line_per_model_and_the_trained_ring(tmp_path):
    figure = depth_figure(_depth_rows(), "ndcg@10")
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in axes] == ["reason_step", "test_recurrence"]
    assert axes[0].get_ylabel() == "ndcg@10" and axes[0].get_ylim() == axes[1].get_ylim()  # one y scale
    lines = {ax.get_xlabel(): [line for line in ax.lines if line.get_label() and not line.get_label().startswith("_")]
             for ax in axes}
    assert [line.get_label() for line in lines["reason_step"]] == ["ReaRec K=2"]
    assert list(lines["reason_step"][0].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["reason_step"][0].get_ydata()) == [0.10, 0.12, 0.15, 0.14]
    rings = [line for line in axes[1].lines if line.get_markerfacecolor() == "none"]
    assert len(rings) == 1 and list(rings[0].get_xdata()) == [4] and list(rings[0].get_ydata()) == [0.13]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["ReaRec K=2", "LARES T=4", "trained depth"]

    files = save_figure(figure, str(tmp_path / "depth"))
    assert_valid_files(files)
    again = save_figure(depth_figure(_depth_rows(), "ndcg@10"), str(tmp_path / "again"))
    for ext in ("png", "pdf", "svg"):  # no timestamps: the same numbers give the same bytes
        assert open(files[ext], "rb").read() == open(again[ext], "rb").read()


def _records():
    records = []
    for seed, (sasrec, rearec) in zip((1, 2, 3), ((0.10, 0.12), (0.11, 0.14), (0.12, 0.13))):
        setup = {"valid_metric": "NDCG@10"}
        records.append({"label": "SASRec", "model": "SASRec", "dataset": "ml-100k", "seed": seed, "eval_setup": setup,
                        "test": {"recall@10": 2 * sasrec, "ndcg@10": sasrec}, "commit": "abc"})
        records.append({"label": "ReaRec", "model": "ReaRec", "dataset": "ml-100k", "seed": seed, "eval_setup": setup,
                        "test": {"recall@10": 2 * rearec, "ndcg@10": rearec}, "commit": "abc"})
    records.append({"label": "LARES", "model": "LARES", "dataset": "ml-100k", "seed": 1, "error": "out of memory"})
    return records


def test_comparison_bars_are_the_means_with_std_error_bars(tmp_path):
    summary = summarize(_records(), baseline="SASRec")
    figure = comparison_figure(summary, "ndcg@10")
    ax = figure.axes[0]
    bars = ax.patches
    assert [round(bar.get_width(), 6) for bar in bars] == [0.11, 0.13]  # horizontal bars; LARES failed: no bar
    assert not any(bar.get_hatch() for bar in bars)  # no control among these rows
    from matplotlib.container import ErrorbarContainer

    (errors,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    error_bars = errors.lines[2][0].get_segments()
    half_lengths = [round((segment[1][0] - segment[0][0]) / 2, 6) for segment in error_bars]
    assert half_lengths == [0.01, 0.01]  # sample std over the three seeds
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["SASRec  (n=3)", "ReaRec  (n=3)"]  # one row each
    assert ax.get_yticklabels()[0].get_fontweight() == "bold"  # the baseline's label
    (reference,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert list(reference.get_xdata()) == pytest.approx([0.11, 0.11])  # the baseline's mean, a vertical line
    assert "ndcg@10" in ax.get_xlabel()
    assert comparison_figure(summary, "not-a-metric").axes[0].get_xlabel().startswith("recall@10")  # falls back


def _many_records(n_models):
    """Seeds 1-3 of SASRec and n_models models, each with its no-reasoning control (listed far below it)."""
    records = []
    for seed in (1, 2, 3):
        rows = [("SASRec", None)] + [(f"Model{i}", None) for i in range(n_models)]
        rows += [(f"Model{i}-K0", f"Model{i}") for i in range(n_models)]
        for k, (label, control_of) in enumerate(rows):
            records.append({"label": label, "model": label, "dataset": "ml-100k", "seed": seed,
                            "eval_setup": {"valid_metric": "NDCG@10"}, "test": {"ndcg@10": 0.01 * (k + 1) + 0.001 * seed},
                            **({"control_of": control_of} if control_of else {})})
    return records


def test_comparison_rows_stay_readable_for_many_models_with_controls_below_their_model(tmp_path):
    small = comparison_figure(summarize(_many_records(1), baseline="SASRec"), "ndcg@10")
    large = comparison_figure(summarize(_many_records(8), baseline="SASRec"), "ndcg@10")  # 17 rows
    ax = large.axes[0]
    labels = [tick.get_text().split()[0] for tick in ax.get_yticklabels()]
    assert len(labels) == 17 and labels[:5] == ["SASRec", "Model0", "Model0-K0", "Model1", "Model1-K0"]
    bars = dict(zip(labels, ax.patches))
    assert bars["Model0-K0"].get_hatch() == "//" and not bars["Model0"].get_hatch()  # controls hatched
    from matplotlib.colors import to_rgb

    palette = [to_rgb(color) for color in matplotlib.colormaps["tab20"].colors]
    model, control = (palette.index(to_rgb(bars[label].get_facecolor())) for label in ("Model3", "Model3-K0"))
    assert control == model + 1  # the lighter shade of its model's colour
    # the figure grows by a fixed height per row, so rows never get squeezed together
    small_height, large_height = small.get_size_inches()[1], large.get_size_inches()[1]
    assert large_height - small_height == pytest.approx(14 * BAR_HEIGHT)
    files = save_figure(large, str(tmp_path / "large"), formats=("png",))
    small_files = save_figure(small, str(tmp_path / "small"), formats=("png",))
    assert _png_height(files["png"]) > 2 * _png_height(small_files["png"])


def _png_height(path):
    return int.from_bytes(open(path, "rb").read()[20:24], "big")  # IHDR: width, then height


def test_build_tables_writes_the_comparison_figure(tmp_path):
    import json

    out = tmp_path / "out"
    out.mkdir()
    with open(out / "runs.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in _records())
    files, _ = build_tables(str(out), baseline="SASRec")
    assert_valid_files(files)
    assert files["png"].endswith("comparison.png")
    first = {ext: open(files[ext], "rb").read() for ext in ("png", "pdf", "svg")}
    build_tables(str(out), baseline="SASRec")
    for ext in ("png", "pdf", "svg"):  # a rebuild from the same runs gives the same bytes
        assert open(files[ext], "rb").read() == first[ext]


@pytest.mark.parametrize("ext", ["png", "pdf"])
def test_save_figure_writes_only_the_formats_asked(tmp_path, ext):
    files = save_figure(depth_figure(_depth_rows(), "hit@10"), str(tmp_path / "sub" / "fig"), formats=(ext,))
    assert list(files) == [ext] and (tmp_path / "sub" / f"fig.{ext}").exists()
