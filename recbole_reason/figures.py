"""Paper figures with matplotlib: the reasoning-depth study and the model comparison, as PNG, PDF and SVG.

    depth_figure(rows, metric="ndcg@10")       # rows of depth_study: one panel per depth knob, a line per model
    comparison_figure(summary, metric="ndcg@10")  # tables.summarize: a bar per model, error bars = std over seeds
    save_figure(figure, "out/depth_study")     # -> {'png': ..., 'pdf': ..., 'svg': ...}

Figures are built on `matplotlib.figure.Figure` (no pyplot, no global state, no display needed) and saved without
timestamps, so the same numbers give the same files.
"""

import math
import os

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

FORMATS = ("png", "pdf", "svg")
PANEL_SIZE = (4.2, 3.2)  # inches per panel
TRAINED_MARKER = {"marker": "o", "markersize": 12, "markerfacecolor": "none", "markeredgewidth": 1.5}


def save_figure(figure, stem, formats=FORMATS, dpi=200):
    """Write `figure` to `<stem>.<ext>` for each format; returns {ext: path}. No creation dates in the files."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None},
                "svg": {"Date": None, "Creator": None}}
    files = {}
    with matplotlib.rc_context({"svg.hashsalt": "recbole-reason"}):  # fixed SVG element ids
        for ext in formats:
            files[ext] = f"{stem}.{ext}"
            figure.savefig(files[ext], format=ext, dpi=dpi, bbox_inches="tight", metadata=metadata.get(ext))
    return files


def _grid(n_panels, columns):
    n_cols = min(columns, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    figure = Figure(figsize=(PANEL_SIZE[0] * n_cols + 1.8, PANEL_SIZE[1] * n_rows + 0.5), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    for extra in axes.flat[n_panels:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:n_panels])


def depth_figure(rows, metric, title=None, columns=2):
    """The depth study: `metric` against depth, one panel per depth knob (a beam size of 50 and a reasoning step
    of 2 share no x axis), on one y scale so models stay comparable; a line per label (one color per label across
    panels), the trained / configured depth ringed. rows: depth_study's rows ('label', 'depth_key', 'depth',
    'trained_depth', 'metrics')."""
    panels = {}
    for row in rows:
        line = panels.setdefault(row["depth_key"], {}).setdefault(row["label"], {"points": [], "trained": row["trained_depth"]})
        line["points"].append((row["depth"], row["metrics"][metric]))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    figure, axes = _grid(len(panels), columns)
    for ax, (depth_key, lines) in zip(axes, panels.items()):
        for label, line in lines.items():
            points = sorted(line["points"])
            xs, ys = [x for x, _ in points], [y for _, y in points]
            ax.plot(xs, ys, marker="o", markersize=4, color=colors[label], label=label)
            trained = [(x, y) for x, y in points if x == line["trained"]]
            if trained:
                ax.plot(*trained[0], color=colors[label], linestyle="none", **TRAINED_MARKER)
        depths = sorted({x for line in lines.values() for x, _ in line["points"]})
        if len(depths) <= 12:
            ax.set_xticks(depths)
        ax.set_xlabel(depth_key)
        ax.grid(True, alpha=0.3)
    for ax in axes[::min(columns, len(axes))]:  # the first panel of each row
        ax.set_ylabel(metric)
    handles = [Line2D([], [], color=colors[label], marker="o", markersize=4, label=label) for label in labels]
    handles.append(Line2D([], [], color="black", linestyle="none", label="trained depth", **TRAINED_MARKER))
    figure.legend(handles=handles, loc="outside right upper", frameon=False)
    split = rows[0].get("split", "test")
    figure.suptitle(title or f"{metric} against reasoning depth ({split})")
    return figure


def comparison_figure(summary, metric=None, columns=2):
    """The comparison: one panel per dataset, a bar per model with its mean `metric` over seeds and an error bar of
    the sample std (none for a single seed); the baseline hatched, the seed count under each bar. summary:
    tables.summarize's list of tables. metric: one of the tables' metrics (else the first one). Models that failed on
    every seed have no bar."""
    known = [m for table in summary for m in table["metrics"]]
    metric = metric if metric in known else known[0]
    figure, axes = _grid(len(summary), columns)
    for ax, table in zip(axes, summary):
        rows = [row for row in table["rows"] if metric in row["metrics"]]
        if not rows:
            ax.set_title(f"{table['dataset']}: no run has {metric}")
            continue
        means = [row["metrics"][metric]["mean"] for row in rows]
        stds = [row["metrics"][metric]["std"] for row in rows]
        stds = [0.0 if std is None or (isinstance(std, float) and math.isnan(std)) else std for std in stds]
        bars = ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=[f"C{i % 10}" for i in range(len(rows))],
                      edgecolor="black", linewidth=0.6)
        for bar, row in zip(bars, rows):
            if row["baseline"]:
                bar.set_hatch("//")
        ax.set_xticks(range(len(rows)), [f"{row['label']}\n(n={row['metrics'][metric]['n']})" for row in rows],
                      rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{table['dataset']} ({table['split']})")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[::min(columns, len(axes))]:
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    return figure
