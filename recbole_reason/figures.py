"""Paper figures with matplotlib: the reasoning-depth study and the model comparison, as PNG, PDF and SVG.

    depth_figure(rows, metric="ndcg@10")       # rows of depth_study: one panel per depth knob, a line per model
    comparison_figure(summary, metric="ndcg@10")  # tables.summarize: a row per model, error bars = std over seeds
    save_figure(figure, "out/depth_study")     # -> {'png': ..., 'pdf': ..., 'svg': ...}

Figures are built on `matplotlib.figure.Figure` (no pyplot, no global state, no display needed) and saved without
timestamps, so the same numbers give the same files.
"""

import math
import os

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

FORMATS = ("png", "pdf", "svg")
PANEL_SIZE = (4.2, 3.2)  # inches per panel
BAR_HEIGHT = 0.28  # inches per model row of the comparison chart
BAR_FIGURE_WIDTH = 7.0  # inches
PANEL_MARGIN = 1.1  # inches per comparison panel: title and x axis
LEGEND_HEIGHT = 0.3  # inches
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


def _is_control(row, labels):
    """A control row of a model among `labels` (the chart's rows)."""
    return row.get("control_of") in labels and row["control_of"] != row["label"]


def _bar_order(rows):
    """The rows in table order, each model's controls right below it (a control of a control below that one)."""
    labels = {row["label"] for row in rows}
    controls = {}
    for row in rows:
        if _is_control(row, labels):
            controls.setdefault(row["control_of"], []).append(row)
    ordered, seen = [], set()

    def place(row):
        if row["label"] in seen:
            return
        seen.add(row["label"])
        ordered.append(row)
        for control in controls.get(row["label"], []):
            place(control)

    for row in rows:
        if not _is_control(row, labels):
            place(row)
    for row in rows:  # controls in a cycle (no model among the rows to hang them under)
        place(row)
    return ordered


def _bar_colors(rows):
    """A colour per model (tab20's dark shades, cycling), its controls in the light shade of the same colour."""
    palette = matplotlib.colormaps["tab20"].colors
    colors, models = {}, 0
    for row in rows:  # in bar order: a control comes after its model
        if _is_control(row, colors):
            colors[row["label"]] = palette[(palette.index(colors[row["control_of"]]) // 2) * 2 + 1]
        else:
            colors[row["label"]] = palette[(models % 10) * 2]
            models += 1
    return colors


def comparison_figure(summary, metric=None):
    """The comparison: one panel per dataset (stacked), a horizontal bar per model with its mean `metric` over
    seeds and an error bar of the sample std (none for a single seed), one row per model label with its seed
    count, so the labels never overlap: the figure grows by BAR_HEIGHT per row. Each model's controls sit right
    below it, hatched, in a lighter shade of its colour; the baseline's mean is a dashed vertical line (its label
    in bold). summary: tables.summarize's list of tables. metric: one of the tables' metrics (else the first one).
    Models that failed on every seed have no bar."""
    known = [m for table in summary for m in table["metrics"]]
    metric = metric if metric in known else known[0]
    panels = [[row for row in table["rows"] if metric in row["metrics"]] for table in summary]
    n_bars = [max(len(rows), 1) for rows in panels]  # the axes' heights (constrained layout adds titles, x axes)
    height = sum(n * BAR_HEIGHT + PANEL_MARGIN for n in n_bars) + LEGEND_HEIGHT
    figure = Figure(figsize=(BAR_FIGURE_WIDTH, height), layout="constrained")
    axes = figure.subplots(len(summary), 1, squeeze=False, height_ratios=n_bars)[:, 0]
    baselines, has_control = [], False
    for ax, table, rows in zip(axes, summary, panels):
        if not rows:
            ax.set_title(f"{table['dataset']}: no run has {metric}")
            ax.set_axis_off()
            continue
        ax.set_xlabel(f"{metric} (mean ± std over seeds)")
        rows = _bar_order(rows)
        colors = _bar_colors(rows)
        means = [row["metrics"][metric]["mean"] for row in rows]
        stds = [row["metrics"][metric]["std"] for row in rows]
        stds = [0.0 if std is None or (isinstance(std, float) and math.isnan(std)) else std for std in stds]
        bars = ax.barh(range(len(rows)), means, xerr=stds, capsize=3, height=0.7,
                       color=[colors[row["label"]] for row in rows], edgecolor="black", linewidth=0.6,
                       error_kw={"elinewidth": 1, "ecolor": "black"})
        for bar, row in zip(bars, rows):
            if _is_control(row, colors):
                bar.set_hatch("//")
                has_control = True
        ax.set_yticks(range(len(rows)), [f"{row['label']}  (n={row['metrics'][metric]['n']})" for row in rows],
                      fontsize=8)
        for tick, row in zip(ax.get_yticklabels(), rows):
            if row["baseline"]:
                tick.set_fontweight("bold")
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top, as in the table
        baseline = [row for row in rows if row["baseline"]]
        if baseline:
            ax.axvline(baseline[0]["metrics"][metric]["mean"], color="black", linestyle="--", linewidth=1, zorder=3)
            baselines.append(baseline[0]["label"])
        ax.set_title(f"{table['dataset']} ({table['split']})")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    handles = []
    if baselines:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                              label=f"{' / '.join(dict.fromkeys(baselines))} mean (baseline)"))
    if has_control:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", linewidth=0.6,
                             label="control of the model above (a lighter shade of its colour)"))
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=8)
    return figure
