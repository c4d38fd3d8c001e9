"""Reasoning-depth study: one trained model evaluated at several reasoning depths, without retraining.

    from recbole_reason.depth_study import depth_study
    depth_study(checkpoints=["saved/ReaRec-Nov-23-2026_10-00-00.pth"], depths=[0, 1, 2, 3, 4], out_dir="depth")
    depth_study(model="LARES", dataset="ml-100k", depths=[1, 2, 4, 8])       # no checkpoint: trains one first

The depth knob of each model (its `reasoning_depth_key`, set through `set_reasoning_depth`):
    ReaRec   reason_step            K' reasoning steps (0 = the backbone alone; beyond the trained K the last RPE is reused)
    LARES    test_recurrence        latent reasoning steps T of the shared core block
    R2ec     r2ec_max_reason_len    reasoning tokens generated before [ANS] (0 = no reasoning)
    REG4Rec  beam_size              reasoning paths of the beam search (>= the largest top-k)
A checkpoint is rebuilt with the config stored in it (same dataset, split and seed) and its weights; every depth
is evaluated by the model's RecBole trainer on the same split. Outputs in `out_dir`: `depth_study.md`, `.csv`,
`.jsonl` and `depth_study.svg` (the chosen metric against depth, one line per checkpoint; the trained depth is
the ringed point). Each depth's metrics also go to TensorBoard as `depth_study/<label>/<metric>`, depth as step.

Reasoning-content control (`content_control`, `run_depth_study.py --content_control`; models with
`set_reasoning_content`, i.e. R2ec): the same checkpoint evaluated at its trained depth with its generated
reasoning, with the same number of constant tokens, and with random tokens; per-user paired tests (generated minus
each control, `per_user.paired_test`) say whether a gain comes from what the reasoning says. Writes
`reasoning_content.{md,json}` (per-user values in `reasoning_content_<content>.npz`).
"""

import json
import math
import os

import torch

from recbole_reason.compat import load_checkpoint

OUT_STEM = "depth_study"
SPLITS = ("test", "valid")


def supports_depth(model_class):
    return hasattr(model_class, "set_reasoning_depth") and hasattr(model_class, "reasoning_depth_key")


def _no_depth_error(name):
    from recbole_reason.utils import get_model, plugin_model_names

    with_depth = [m for m in plugin_model_names() if supports_depth(get_model(m))]
    return ValueError(
        f"{name} has no reasoning depth to vary (no set_reasoning_depth). Models with one: "
        + ", ".join(f"{m} ({get_model(m).reasoning_depth_key})" for m in with_depth)
    )


def default_depths(model, config):
    """Depths below, at and beyond the trained one, when none are given."""
    key, trained = model.reasoning_depth_key, current_depth(model)
    if key == "reason_step":
        return list(range(0, trained + 3)) if trained > 0 else [0]
    if key == "test_recurrence":
        return sorted({*(config["depth_scaling_recurrences"] or []), 1, trained, 2 * trained})
    if key == "r2ec_max_reason_len":
        return list(range(0, trained + 1)) if trained <= 8 else sorted({0, trained // 4, trained // 2, trained})
    return sorted({max(model.max_topk, 1), trained, 2 * trained})  # beam_size


def _parse_depths(depths):
    if depths is None:
        return None
    if isinstance(depths, str):
        depths = [d for d in depths.replace(",", " ").split() if d]
    out = []
    for depth in depths:
        try:
            number = float(depth)
        except (TypeError, ValueError):
            number = math.nan
        if not number.is_integer():
            raise ValueError(f"depths must be integers, got {depth!r} in {depths}")
        out.append(int(number))
    if not out:
        raise ValueError("depths is empty: give at least one depth, or None for the model's defaults")
    return list(dict.fromkeys(out))


def apply_evaluation_settings(config, config_dict):
    """Set evaluation-side settings (data_path, eval_batch_size, ...) on a checkpoint's stored config.

    `data_path` means what it means to a training run, the folder that holds <dataset>/, so it is joined with the
    dataset name as RecBole's Config does; ml-100k always reads the copy inside this machine's recbole package, as in
    training (the stored path may be another machine's, e.g. the GPU machine's site-packages)."""
    for key, value in (config_dict or {}).items():
        config[key] = os.path.join(value, config["dataset"]) if key == "data_path" else value
    if config["dataset"] == "ml-100k":
        import recbole.config

        config["data_path"] = os.path.join(os.path.dirname(os.path.realpath(recbole.config.__file__)),
                                           "..", "dataset_example", "ml-100k")
    return config


def _load_for_evaluation(checkpoint_file, config_dict):
    """Config, eval loaders, model (weights loaded) and trainer of a checkpoint, on this machine's device."""
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_reason.distributed import init_rank_logger
    from recbole_reason.utils import create_dataset, get_model, get_trainer

    if not os.path.isfile(checkpoint_file):
        raise FileNotFoundError(f"checkpoint {checkpoint_file} does not exist (a .pth file written by a training run).")
    checkpoint = load_checkpoint(checkpoint_file, map_location="cpu")
    config = checkpoint.get("config")
    if config is None:
        raise ValueError(f"{checkpoint_file} holds no RecBole config: pass a checkpoint saved by a training run.")
    model_class = get_model(config["model"])
    if not supports_depth(model_class):
        raise _no_depth_error(config["model"])
    apply_evaluation_settings(config, config_dict)
    if config["device"].type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    init_seed(config["seed"], config["reproducibility"])
    init_rank_logger(config)  # the study's own log file and TensorBoard folder, not the training run's
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return config, {"test": test_data, "valid": valid_data}, model, trainer


def depth_study(checkpoints=None, model=None, dataset=None, depths=None, config_file_list=None, config_dict=None,
                out_dir="depth_study", split="test", metric=None, labels=None, show_progress=None):
    """Evaluate every checkpoint at every depth; write the table, the SVG plot and the JSONL to `out_dir`.

    checkpoints: trained .pth files (several = several lines in the plot). None: train `model` on `dataset` first
    (with config_file_list / config_dict) and study that checkpoint. config_dict is applied on top of each
    checkpoint's stored config (e.g. data_path, eval_batch_size). depths: ints, or None for `default_depths`.
    metric: the plotted metric (default: the config's valid_metric). Returns {'rows', 'files'}."""
    from recbole.utils import set_color
    from tqdm import tqdm

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    depths = _parse_depths(depths)
    checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
    if not checkpoints:
        checkpoints = [_train_first(model, dataset, config_file_list, config_dict)]
        config_dict = None  # the run's own settings are in its checkpoint
    labels = list(labels) if labels else _default_labels(checkpoints)
    if len(labels) != len(checkpoints):
        raise ValueError(f"labels: one per checkpoint, got {len(labels)} labels for {len(checkpoints)} checkpoints")

    rows = []
    for checkpoint_file, label in zip(checkpoints, labels):
        config, loaders, net, trainer = _load_for_evaluation(checkpoint_file, config_dict)
        progress = bool(config["show_progress"]) if show_progress is None else show_progress
        trained = current_depth(net)
        wanted = depths or default_depths(net, config)
        for depth in wanted:  # every depth is validated before any evaluation runs
            net.set_reasoning_depth(depth)
        net.set_reasoning_depth(trained)
        eval_data = loaders[split]
        trainer.tensorboard.add_text("stage/transition", f"depth study of {label}: {net.reasoning_depth_key} in {wanted}", 0)
        results = {trained: trainer.evaluate(eval_data, load_best_model=True, model_file=checkpoint_file)}
        try:
            for depth in tqdm(wanted, desc=f"depth study {label}", unit="depth", disable=not progress):
                if depth not in results:
                    net.set_reasoning_depth(depth)
                    results[depth] = trainer.evaluate(eval_data, load_best_model=False, show_progress=False)
        finally:
            net.set_reasoning_depth(trained)
        for depth in wanted:
            result = {k: float(v) for k, v in results[depth].items()}
            for name, value in result.items():
                trainer.tensorboard.add_scalar(f"depth_study/{label}/{name}", value, depth)
            trainer.logger.info(set_color(f"{label} at {net.reasoning_depth_key}={depth}", "yellow") + f": {result}")
            rows.append({"label": label, "checkpoint": os.path.abspath(checkpoint_file), "model": config["model"],
                         "dataset": config["dataset"], "split": split, "depth_key": net.reasoning_depth_key,
                         "depth": depth, "trained_depth": trained, "metrics": result,
                         "valid_metric": str(config["valid_metric"]).lower()})
        trainer.tensorboard.flush()
        del net, trainer, loaders

    metric = (metric or rows[0]["valid_metric"]).lower()
    if any(metric not in row["metrics"] for row in rows):
        raise ValueError(f"metric {metric!r} is not among the evaluated metrics {sorted(rows[0]['metrics'])}")
    files = write_outputs(rows, out_dir, metric)
    return {"rows": rows, "files": files}


# The model attribute that holds each depth knob's value.
DEPTH_ATTRIBUTES = {"reason_step": "reason_step", "test_recurrence": "test_recurrence",
                    "r2ec_max_reason_len": "max_reason_len", "beam_size": "beam_size"}


def current_depth(model):
    return int(getattr(model, DEPTH_ATTRIBUTES[model.reasoning_depth_key]))


def _default_labels(checkpoints):
    stems = [os.path.splitext(os.path.basename(path))[0] for path in checkpoints]
    return stems if len(set(stems)) == len(stems) else [f"{i + 1}: {stem}" for i, stem in enumerate(stems)]


def _train_first(model, dataset, config_file_list, config_dict):
    from recbole_reason.quick_start import run_recbole_reason
    from recbole_reason.utils import get_model

    if not model or not dataset:
        raise ValueError("depth study: pass trained checkpoints, or a model and a dataset to train one first.")
    if not supports_depth(get_model(model)):  # before any training time is spent
        raise _no_depth_error(model)
    result = run_recbole_reason(model, dataset, config_file_list=config_file_list, config_dict=config_dict, saved=True)
    return result["saved_model_file"]


# -- the reasoning-content control ----------------------------------------------------------------------------------
CONTENTS = ("generated", "constant", "random")


def content_control_results(net, trainer, eval_data, metric="ndcg@10"):
    """Evaluate a model (weights in place) with each reasoning content; returns ({content: averaged result},
    {content: per-user values}, {control: paired test of generated against it on `metric`})."""
    from recbole_reason.per_user import align, paired_test, per_user_metrics

    if not hasattr(net, "set_reasoning_content"):
        raise ValueError(f"{type(net).__name__} has no reasoning content to control (no set_reasoning_content); "
                         "R2ec has one.")
    results, values = {}, {}
    try:
        for content in CONTENTS:
            net.set_reasoning_content(content)
            results[content], values[content] = per_user_metrics(trainer, eval_data, load_best_model=False)
    finally:
        net.set_reasoning_content("generated")
    tests = {}
    for control in CONTENTS[1:]:
        generated, other, _ = align(values["generated"], values[control], metric)
        tests[control] = paired_test(generated, other, alternative="greater")
    return results, values, tests


def content_control(checkpoint_file, config_dict=None, split="test", metric=None, out_dir="depth_study"):
    """`content_control_results` on a checkpoint (rebuilt as the depth study does); writes its outputs."""
    from recbole_reason.per_user import save_per_user

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    config, loaders, net, trainer = _load_for_evaluation(checkpoint_file, config_dict)
    if not hasattr(net, "set_reasoning_content"):
        raise ValueError(f"{config['model']} has no reasoning content to control (no set_reasoning_content); "
                         "R2ec has one.")
    trainer.load_model_weights(checkpoint_file)
    metric = (metric or str(config["valid_metric"])).lower()
    results, values, tests = content_control_results(net, trainer, loaders[split], metric)
    os.makedirs(out_dir, exist_ok=True)
    for content, per_user in values.items():
        save_per_user(os.path.join(out_dir, f"reasoning_content_{content}.npz"), per_user)
    record = {"checkpoint": os.path.abspath(checkpoint_file), "model": config["model"], "dataset": config["dataset"],
              "split": split, "metric": metric, "depth": current_depth(net),
              "results": {c: {k: float(v) for k, v in r.items()} for c, r in results.items()}, "paired": tests}
    files = {"json": os.path.join(out_dir, "reasoning_content.json"), "md": os.path.join(out_dir, "reasoning_content.md")}
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(files["md"], "w", encoding="utf-8") as f:
        f.write(content_control_markdown(record))
    return {"record": record, "files": files}


def content_control_markdown(record):
    metric = record["metric"]
    lines = [f"## Reasoning-content control ({record['model']}, {record['dataset']}, {record['split']} split, "
             f"{record['depth']} reasoning tokens)", "",
             "The same weights; h_u read after the generated reasoning, or after the same number of constant / random "
             "tokens. Paired over users: generated minus control (one-sided Wilcoxon and t-test, 95% bootstrap CI).", "",
             f"| reasoning | {metric} | diff vs generated | Wilcoxon p | t-test p | 95% CI of generated - control |",
             "|---|---:|---:|---:|---:|---|"]
    for content, result in record["results"].items():
        test = record["paired"].get(content)
        if test is None:
            lines.append(f"| {content} | {result[metric]:.4f} | | | | |")
        else:
            lines.append(f"| {content} | {result[metric]:.4f} | {test['mean_diff']:+.4f} | {test['wilcoxon_p']:.3g} | "
                         f"{test['ttest_p']:.3g} | [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}] |")
    return "\n".join(lines) + "\n"


# -- outputs -----------------------------------------------------------------------------------------------------
def write_outputs(rows, out_dir, metric):
    os.makedirs(out_dir, exist_ok=True)
    files = {ext: os.path.join(out_dir, f"{OUT_STEM}.{ext}") for ext in ("md", "csv", "jsonl", "svg")}
    metrics = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    with open(files["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    lines = [f"## Reasoning-depth study ({rows[0]['split']} split)", "",
             "Each model is evaluated at every depth with its trained weights (no retraining); "
             "(trained) marks the depth it was trained / configured with.", "",
             "| model | depth knob | depth | " + " | ".join(metrics) + " |", "|---|---|---:|" + "---:|" * len(metrics)]
    for row in rows:
        depth = f"{row['depth']}" + (" (trained)" if row["depth"] == row["trained_depth"] else "")
        lines.append(f"| {row['label']} ({row['model']}, {row['dataset']}) | {row['depth_key']} | {depth} | "
                     + " | ".join(f"{row['metrics'][m]:.4f}" for m in metrics) + " |")
    with open(files["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    import csv

    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "model", "dataset", "split", "checkpoint", "depth_key", "depth", "trained_depth"] + metrics)
        for row in rows:
            writer.writerow([row["label"], row["model"], row["dataset"], row["split"], row["checkpoint"],
                             row["depth_key"], row["depth"], row["trained_depth"]] + [row["metrics"][m] for m in metrics])
    panels = {}  # one panel per depth knob, in the order the models come
    for row in rows:
        line = panels.setdefault(row["depth_key"], {}).setdefault(
            row["label"], {"points": [], "marked": row["trained_depth"]})
        line["points"].append((row["depth"], row["metrics"][metric]))
    with open(files["svg"], "w", encoding="utf-8") as f:
        f.write(svg_panel_plot(list(panels.items()), y_label=metric,
                               title=f"{metric} against reasoning depth ({rows[0]['split']})"))
    return files


# -- a small self-contained SVG line plot (no plotting library is a dependency) -----------------------------------------
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def nice_ticks(low, high, count=5):
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:  # a flat line: a band around the value
        pad = abs(low) * 0.1 or 0.5
        low, high = low - pad, low + pad
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]
    return [round(t, 12) for t in ticks]


def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def svg_panel_plot(panels, y_label, title, plot_w=None, plot_h=None, columns=2):
    """panels: [(x_label, series), ...] with series {name: {'points': [(x, y), ...], 'marked': x or None}} -> an SVG
    document: one panel per depth knob (a beam size of 50 and a reasoning step of 2 do not share an x axis) in rows of
    `columns`, each with axes, ticks, one polyline per series with point markers and a ring at its marked x; all on
    one y scale so models stay comparable; one legend, one color per series name across panels."""
    plot_w = plot_w or (460 if len(panels) == 1 else 300)
    plot_h = plot_h or (300 if len(panels) == 1 else 220)
    names = list(dict.fromkeys(name for _, series in panels for name in series))
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    marked = any(s.get("marked") is not None for _, series in panels for s in series.values())
    ys = [y for _, series in panels for s in series.values() for _, y in s["points"]]
    y_ticks = nice_ticks(min(ys), max(ys))
    left, top, bottom, gap = 70, 40, 55, 30
    cell_w, cell_h = left + plot_w + gap, plot_h + bottom
    legend_w = 60 + 7 * max(len(str(name)) for name in names + (["trained depth"] if marked else []))
    n_cols = min(columns, len(panels))
    width = n_cols * cell_w - gap + legend_w
    height = top + cell_h * math.ceil(len(panels) / n_cols)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{(width - legend_w) / 2:.1f}" y="22" text-anchor="middle" font-size="14">{_escape(title)}</text>']
    for index, (x_label, series) in enumerate(panels):
        ox, oy = (index % n_cols) * cell_w, top + (index // n_cols) * cell_h
        out.append(f'<g class="panel" transform="translate({ox} {oy})">')
        out += _panel(series, x_label, y_label, y_ticks, color, left, plot_w, plot_h)
        out.append("</g>")
    legend_x = width - legend_w
    for index, name in enumerate(names):
        ly = top + 10 + 20 * index
        out.append(f'<line x1="{legend_x + 15}" y1="{ly}" x2="{legend_x + 40}" y2="{ly}" stroke="{color[name]}" '
                   f'stroke-width="2"/><text x="{legend_x + 45}" y="{ly + 4}">{_escape(name)}</text>')
    if marked:
        ly = top + 10 + 20 * len(names)
        out.append(f'<circle cx="{legend_x + 27}" cy="{ly}" r="6" fill="none" stroke="black"/>'
                   f'<text x="{legend_x + 45}" y="{ly + 4}">trained depth</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(series, x_label, y_label, y_ticks, color, left, plot_w, plot_h):
    """One panel's axes, ticks, axis labels and lines, its plot area at (left, 0)."""
    xs = [x for s in series.values() for x, _ in s["points"]]
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 12 else nice_ticks(min(xs), max(xs))
    x0, x1 = min(x_ticks + xs), max(x_ticks + xs)
    y0, y1 = min(y_ticks), max(y_ticks)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x):
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y):
        return plot_h - (y - y0) / (y1 - y0) * plot_h

    out = [f'<line x1="{left}" y1="{plot_h}" x2="{left + plot_w}" y2="{plot_h}" stroke="black"/>',
           f'<line x1="{left}" y1="0" x2="{left}" y2="{plot_h}" stroke="black"/>']
    for x in x_ticks:
        out.append(f'<line x1="{px(x):.1f}" y1="{plot_h}" x2="{px(x):.1f}" y2="{plot_h + 5}" stroke="black"/>'
                   f'<text x="{px(x):.1f}" y="{plot_h + 18}" text-anchor="middle">{x:g}</text>')
    for y in y_ticks:
        out.append(f'<line x1="{left - 5}" y1="{py(y):.1f}" x2="{left}" y2="{py(y):.1f}" stroke="black"/>'
                   f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{plot_h + 40}" text-anchor="middle">{_escape(x_label)}</text>')
    out.append(f'<text transform="translate(16 {plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{_escape(y_label)}</text>')
    for name, s in series.items():
        points = sorted(s["points"])
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline class="series" data-name="{_escape(name)}" points="{path}" fill="none" '
                   f'stroke="{color[name]}" stroke-width="2"/>')
        for x, y in points:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color[name]}"/>')
            if x == s.get("marked"):
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="7" fill="none" stroke="{color[name]}"/>')
    return out
