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
`.jsonl` and the figure `depth_study.png` / `.pdf` / `.svg` (matplotlib, `recbole_reason.figures.depth_figure`:
the chosen metric against depth, one panel per depth knob, one line per checkpoint; the trained depth is the
ringed point). Each depth's metrics also go to TensorBoard as `depth_study/<label>/<metric>`, depth as step.

Reasoning-content control (`content_control`, `run_depth_study.py --content_control`; models with
`set_reasoning_content`, i.e. R2ec): the same checkpoint evaluated at its trained depth with its generated
reasoning, with the same number of constant tokens, and with random tokens; per-user paired tests (generated minus
each control, `per_user.paired_test`) say whether a gain comes from what the reasoning says. Writes
`reasoning_content.{md,json}` (per-user values in `reasoning_content_<content>.npz`).
"""

import collections
import json
import math
import os

from recbole_reason.inference import apply_evaluation_settings, rebuild_from_checkpoint  # noqa: F401 (the loading rule of checkpoints)

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


def _load_for_evaluation(checkpoint_file, config_dict):
    """Config, eval loaders, model and trainer of a checkpoint, on this machine's device (the trainer loads the
    weights, with the checkpoint checks); a model without a depth is refused before any data is read."""
    from recbole_reason.utils import get_trainer

    def check_model(name, model_class):
        if not supports_depth(model_class):
            raise _no_depth_error(name)

    _, config, _, (_, valid_data, test_data), model = rebuild_from_checkpoint(checkpoint_file, config_dict, check_model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return config, {"test": test_data, "valid": valid_data}, model, trainer


def depth_study(checkpoints=None, model=None, dataset=None, depths=None, config_file_list=None, config_dict=None,
                out_dir="depth_study", split="test", metric=None, labels=None, show_progress=None):
    """Evaluate every checkpoint at every depth; write the table, the figure (PNG, PDF, SVG) and the JSONL to `out_dir`.

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


def reasoning_diversity(net, eval_data):
    """How many different reasonings R2ec writes for the users of a full-sort loader (greedy, as evaluated): a
    policy that writes one string for everyone carries no user information in what it says, whatever its metric.
    Returns {'users', 'distinct', 'top_share' (share of users given the most common reasoning), 'top' (its token
    ids)}."""
    import torch

    if not hasattr(net, "set_reasoning_content"):
        raise ValueError(f"{type(net).__name__} writes no reasoning to count; R2ec does.")
    was_training = net.training
    net.eval()
    counts = collections.Counter()
    pad = net.backbone.pad_id
    try:
        with torch.no_grad():
            for batch in eval_data:
                reasoning, _ = net._answer(net.backbone.user_prompts(batch[0].to(net.device)))
                counts.update(tuple(int(t) for t in row if int(t) != pad) for row in reasoning.tokens.cpu())
    finally:
        net.train(was_training)
    users = sum(counts.values())
    top, top_count = counts.most_common(1)[0]
    return {"users": users, "distinct": len(counts), "top_share": top_count / users, "top": list(top)}


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
    files = {ext: os.path.join(out_dir, f"{OUT_STEM}.{ext}") for ext in ("md", "csv", "jsonl")}
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
    from recbole_reason.figures import depth_figure, save_figure

    files.update(save_figure(depth_figure(rows, metric), os.path.join(out_dir, OUT_STEM)))  # png, pdf, svg
    return files
