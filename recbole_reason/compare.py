"""Fair side-by-side comparison of plugin models and RecBole baselines, over seeds, with significance tests.

    from recbole_reason.compare import compare
    compare(["SASRec", "ReaRec", "LARES"], ["ml-100k"], seeds=[2020, 2021, 2022], baseline="SASRec",
            config_file_list=["my.yaml"], out_dir="results/ml-100k")

Every (model, dataset, seed) run goes through the same path as the run script and tuning
(`quick_start.objective_function`: the plugin's Config, dataset, split, trainer and RecBole's Evaluator) with the
same config files and config dict; only the seed and a variant's own overrides differ. RecBole seeds the split,
the sampler and the model from `seed`, so two models run with one seed see the same split and are paired.

Each run appends one JSON line to `<out_dir>/runs.jsonl`; the tables (`comparison.md`, `.csv`, `.tex`) are rebuilt
from every line of that file, so a table can be filled in parts (one model or one dataset per call) and rebuilt
without running anything (`build_tables`). A run already in the file with the same setup is not run again.

Table: mean ± sample std over seeds for every metric of the run's config (`metrics` x `topk`), the best mean of
each column in bold (smallest for RecBole's smaller-is-better metrics), and for every model but the baseline the
p-value of a ONE-SIDED paired t-test over the seeds both ran, H1: the model is better than the baseline
(`alternative='greater'`, or `'less'` for smaller-is-better metrics). A model that fails is a row with its error.
"""

import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import time
import traceback
import warnings

import numpy as np

from recbole_reason.cli import parse_setting

RUNS_FILE = "runs.jsonl"
TABLE_STEM = "comparison"
DECIMALS = 4
# Settings that must be equal for runs to be comparable; recorded per run and checked when a table is built.
EVAL_SETUP_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "MAX_ITEM_LIST_LENGTH", "train_neg_sample_args")
SPLITS = ("test", "valid")


# -- statistics (also used by bench/run_bench.py) ------------------------------------------------------------------
def smaller_is_better(metric):
    """True for RecBole metrics where lower is better (MAE, RMSE, LogLoss, AveragePopularity, GiniIndex).
    `metric` as in a result dict: 'averagepopularity@10', 'rmse'."""
    from recbole.evaluator.register import smaller_metrics

    return metric.split("@")[0].lower() in smaller_metrics


def mean_std(values):
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def one_sided_paired_ttest(model_values, baseline_values, smaller_better=False):
    """p-value of the paired t-test of H0: no difference against H1: the model is BETTER than the baseline, i.e.
    mean(model - baseline) > 0 ('greater'), or < 0 for a smaller-is-better metric ('less'). Pairs are positions
    (one seed each). None with fewer than two pairs; nan when every difference is zero (no test possible)."""
    from scipy import stats

    model_values, baseline_values = np.asarray(model_values, float), np.asarray(baseline_values, float)
    if model_values.shape != baseline_values.shape:
        raise ValueError(f"paired t-test needs one baseline value per model value, got {model_values.shape} and "
                         f"{baseline_values.shape}")
    if len(model_values) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical pairs: scipy warns, p is still defined
        result = stats.ttest_rel(model_values, baseline_values, alternative="less" if smaller_better else "greater")
    return float(result.pvalue)


def format_p(p):
    if p is None:
        return "–"
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# -- models and variants --------------------------------------------------------------------------------------------
def cli_config_overrides(args):
    """A script's leftover `--key=value` arguments (values read as YAML) -> a config dict. The scripts pass them
    as `config_dict` rather than leaving them to Config's command-line reader, so they are part of each run's
    recorded setup (a changed setting is a new run, not a skipped one)."""
    overrides = {}
    for arg in args:
        if not (arg.startswith("--") and "=" in arg):
            raise ValueError(f"unrecognised argument {arg!r}: config settings are --key=value")
        key, value = parse_setting(arg[2:])
        overrides[key] = value
    return overrides


def parse_variant(text):
    """'Label=Model key=value key=value' (values as YAML) -> (label, model, overrides); the CLI's --variant."""
    head, *pairs = text.split()
    if "=" not in head:
        raise ValueError(f"--variant must start with LABEL=MODEL (e.g. 'ReaRec-PRL=ReaRec rearec_mode=prl'), got {text!r}")
    label, model = head.split("=", 1)
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--variant settings are key=value, got {pair!r} in {text!r}")
        key, value = parse_setting(pair)
        overrides[key] = value
    return label, model, overrides


def normalize_models(models):
    """Models as (label, model class name, overrides). An entry is a name ('SASRec'), a tuple (label, model[,
    overrides]) or a dict {'label', 'model', 'config'}. Labels must be unique."""
    out = []
    for entry in models:
        if isinstance(entry, str):
            out.append((entry, entry, {}))
        elif isinstance(entry, dict):
            out.append((entry.get("label", entry["model"]), entry["model"], dict(entry.get("config") or {})))
        elif isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
            out.append((entry[0], entry[1], dict(entry[2]) if len(entry) == 3 else {}))
        else:
            raise ValueError(f"a model is a name, (label, model, overrides) or {{'label', 'model', 'config'}}; got {entry!r}")
    labels = [label for label, _, _ in out]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"model labels must be unique, got {duplicated} more than once: give variants their own label")
    if not out:
        raise ValueError("compare needs at least one model")
    return out


# -- running ---------------------------------------------------------------------------------------------------------
def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _file_digest(files):
    digest = hashlib.sha1()
    for file in files or []:
        digest.update(os.path.abspath(file).encode())
        if os.path.isfile(file):
            with open(file, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def setup_key(model, overrides, config_file_list, config_dict):
    """What a run depends on besides the seed: a rerun with the same key is skipped."""
    text = json.dumps([model, _jsonable(overrides), _file_digest(config_file_list), _jsonable(config_dict or {})], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device=None):
    """What ran the run, for the tables: the GPU's name, or the CPU with its cores and torch threads."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def run_one(label, model, dataset, seed, config_file_list=None, config_dict=None, overrides=None, saved=True):
    """Train and test one model once; returns the JSONL record (with `error` instead of results if it failed)."""
    from recbole_reason.config import Config
    from recbole_reason.quick_start import objective_function

    run_dict = {**(config_dict or {}), **(overrides or {}), "model": model, "dataset": dataset, "seed": seed}
    record = {"label": label, "model": model, "dataset": dataset, "seed": seed,
              "setup": setup_key(model, overrides, config_file_list, config_dict),
              "config_files": [os.path.abspath(f) for f in config_file_list or []],
              "overrides": _jsonable(overrides or {}), "config_dict": _jsonable(config_dict or {}),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    start = time.perf_counter()
    try:
        config = Config(config_dict=run_dict, config_file_list=config_file_list)
        record["eval_setup"] = _jsonable({key: config[key] for key in EVAL_SETUP_KEYS})
        record["device"] = device_name(config["device"])
        result = objective_function(run_dict, config_file_list, saved=saved)
        record.update(
            test={k: float(v) for k, v in (result["test_result"] or {}).items()},
            valid={k: float(v) for k, v in (result["best_valid_result"] or {}).items()},
            saved_model_file=result.get("saved_model_file"),
            extra=_jsonable({k: v for k, v in result.items() if k not in (
                "model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result", "saved_model_file")}),
        )
    except Exception as error:  # a failed model is a row of the table; the other runs go on
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=-8)
    record["seconds"] = time.perf_counter() - start
    record["commit"] = git_commit()
    return record


def load_records(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(models, datasets, seeds, config_file_list=None, config_dict=None, baseline=None, out_dir="compare_results",
            split="test", saved=True, rerun=False, show_progress=None, command=None):
    """Run every model on every dataset with every seed (same config files and dict), append the runs to
    `<out_dir>/runs.jsonl` and rebuild the tables from it. Returns {'records': this call's records,
    'summary': per-dataset rows, 'files': {'md', 'csv', 'tex', 'jsonl'}}.

    models: names ('SASRec', 'ReaRec') or variants (label, model, overrides); baseline: the label every other
    model is t-tested against (must be among `models`, or None for no test); rerun: run again even if the file
    already holds a successful run with the same setup; show_progress: a tqdm bar over the runs (default: the
    config's `show_progress`)."""
    variants = normalize_models(models)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    seeds = [int(seed) for seed in ([seeds] if isinstance(seeds, (int, str)) else seeds)]
    if not datasets or not seeds:
        raise ValueError(f"compare needs at least one dataset and one seed, got datasets={datasets}, seeds={seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (each is one paired run), got {seeds}")
    labels = [label for label, _, _ in variants]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the models {labels}: add it, or pass baseline=None")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, RUNS_FILE)
    if show_progress is None:
        show_progress = _config_show_progress(variants[0][1], datasets[0], config_file_list, config_dict)

    done = {(r["label"], r["dataset"], r["seed"], r.get("setup")) for r in load_records(jsonl) if "error" not in r}
    jobs = [(label, model, overrides, dataset, seed) for dataset in datasets for label, model, overrides in variants
            for seed in seeds]
    from tqdm import tqdm

    records = []
    bar = tqdm(jobs, desc="compare", unit="run", disable=not show_progress)
    for label, model, overrides, dataset, seed in bar:
        bar.set_postfix_str(f"{label} on {dataset}, seed {seed}")
        if not rerun and (label, dataset, seed, setup_key(model, overrides, config_file_list, config_dict)) in done:
            continue
        record = run_one(label, model, dataset, seed, config_file_list, config_dict, overrides, saved=saved)
        records.append(record)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    bar.close()
    files, summary = build_tables(out_dir, baseline=baseline, split=split, command=command)
    return {"records": records, "summary": summary, "files": files}


def _config_show_progress(model, dataset, config_file_list, config_dict):
    from recbole_reason.config import Config

    try:
        config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        return bool(config["show_progress"])
    except Exception:  # an unknown model fails again, with its message, as a table row
        return False


# -- tables ----------------------------------------------------------------------------------------------------------
def summarize(records, baseline=None, split="test"):
    """Per dataset: the metric columns and one row per model label (first-seen order) with mean, std, p-value and
    best flag per metric; failed models carry their error. Of repeated runs of a (label, dataset, seed), the last
    successful one counts."""
    summary = []
    for dataset in list(dict.fromkeys(r["dataset"] for r in records)):
        rows_of = [r for r in records if r["dataset"] == dataset]
        labels = list(dict.fromkeys(r["label"] for r in rows_of))
        latest = {}
        for r in rows_of:
            if "error" not in r and r.get(split):
                latest[(r["label"], r["seed"])] = r
        metrics = list(dict.fromkeys(m for r in latest.values() for m in r[split]))
        setups = {json.dumps(r.get("eval_setup"), sort_keys=True) for r in latest.values()}
        base = {seed: r[split] for (label, seed), r in latest.items() if label == baseline}
        rows = []
        for label in labels:
            runs = sorted((r for (lab, _), r in latest.items() if lab == label), key=lambda r: r["seed"])
            errors = [r for r in rows_of if r["label"] == label and "error" in r and (label, r["seed"]) not in latest]
            row = {"label": label, "baseline": label == baseline, "seeds": [r["seed"] for r in runs],
                   "failed_seeds": sorted({r["seed"] for r in errors}), "error": errors[-1]["error"] if errors else None,
                   "metrics": {}}
            for metric in metrics:
                values = [r[split][metric] for r in runs if metric in r[split]]
                if not values:
                    continue
                mean, std = mean_std(values)
                cell = {"mean": mean, "std": std, "n": len(values), "p": None}
                if baseline is not None and label != baseline:
                    paired = [(r[split][metric], base[r["seed"]][metric]) for r in runs
                              if r["seed"] in base and metric in base[r["seed"]]]
                    if paired:
                        cell["p"] = one_sided_paired_ttest(*zip(*paired), smaller_better=smaller_is_better(metric))
                        cell["paired_seeds"] = len(paired)
                row["metrics"][metric] = cell
            rows.append(row)
        for metric in metrics:  # best per column, at the precision shown
            shown = {row["label"]: round(row["metrics"][metric]["mean"], DECIMALS) for row in rows if metric in row["metrics"]}
            if shown:
                best = (min if smaller_is_better(metric) else max)(shown.values())
                for row in rows:
                    if metric in row["metrics"]:
                        row["metrics"][metric]["best"] = shown[row["label"]] == best
        summary.append({"dataset": dataset, "metrics": metrics, "rows": rows, "split": split, "baseline": baseline,
                        "mixed_setup": len(setups) > 1})
    return summary


def _notes(table):
    notes = []
    if table["baseline"]:
        notes.append(f"p: one-sided paired t-test over seeds against {table['baseline']}, H1: the model is better "
                     "(greater mean; smaller for smaller-is-better metrics).")
    if table["mixed_setup"]:
        notes.append("WARNING: these runs do not share one evaluation setup (eval_args / metrics / topk / valid_metric / "
                     "MAX_ITEM_LIST_LENGTH differ): the rows are not comparable. See eval_setup in runs.jsonl.")
    return notes


def _cell_text(cell, bold, plus_minus, p_text):
    text = f"{cell['mean']:.{DECIMALS}f}{plus_minus}{cell['std']:.{DECIMALS}f}"
    text = bold(text) if cell.get("best") else text
    return text + (p_text(format_p(cell["p"])) if cell.get("p") is not None else "")


def _model_text(row):
    return row["label"] + (" (baseline)" if row["baseline"] else "")


def _seeds_text(row):
    n_failed = len(row["failed_seeds"])
    return f"{len(row['seeds'])}" + (f" ({n_failed} failed)" if n_failed else "")


def to_markdown(summary, header=""):
    def escape(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [header] if header else []
    for table in summary:
        lines += ["", f"### {table['dataset']} ({table['split']})", ""] + [f"{note}" for note in _notes(table)] + [""]
        columns = table["metrics"] or ["result"]  # every run of the dataset failed: no metric is known
        lines.append("| model | seeds | " + " | ".join(columns) + " |")
        lines.append("|---|---:|" + "---:|" * len(columns))
        for row in table["rows"]:
            if not row["seeds"]:
                cells = [f"FAILED: {escape(row['error'])}"] + ["–"] * (len(columns) - 1)
            else:
                cells = [_cell_text(row["metrics"][m], lambda t: f"**{t}**", " ± ", lambda p: f" (p={p})")
                         if m in row["metrics"] else "–" for m in table["metrics"]]
            lines.append(f"| {escape(_model_text(row))} | {_seeds_text(row)} | " + " | ".join(cells) + " |")
        errors = [row for row in table["rows"] if row["seeds"] and row["error"]]
        lines += [""] + [f"- {row['label']} failed on seeds {row['failed_seeds']}: {escape(row['error'])}" for row in errors]
    return "\n".join(lines).rstrip() + "\n"


def to_csv_rows(summary):
    rows = []
    for table in summary:
        for row in table["rows"]:
            out = {"dataset": table["dataset"], "split": table["split"], "model": row["label"],
                   "baseline": table["baseline"] or "", "n_seeds": len(row["seeds"]),
                   "seeds": " ".join(map(str, row["seeds"])), "failed_seeds": " ".join(map(str, row["failed_seeds"])),
                   "error": row["error"] or ""}
            for metric in table["metrics"]:
                cell = row["metrics"].get(metric, {})
                out[f"{metric}_mean"] = cell.get("mean", "")
                out[f"{metric}_std"] = cell.get("std", "")
                out[f"{metric}_p"] = "" if cell.get("p") is None else cell["p"]
                out[f"{metric}_best"] = bool(cell.get("best", False))
            rows.append(out)
    return rows


def write_csv(summary, path):
    import csv

    rows = to_csv_rows(summary)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _latex_escape(text):
    for char, replacement in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                              ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(char, replacement)
    return text


def to_latex(summary):
    """One self-contained tabular per dataset (no packages beyond LaTeX itself)."""
    parts = []
    for table in summary:
        metrics = table["metrics"] or ["result"]
        lines = [r"\begin{table}[t]", r"\centering",
                 rf"\caption{{{_latex_escape(table['dataset'])} ({table['split']}): mean $\pm$ std over seeds"
                 + (rf"; p: one-sided paired t-test against {_latex_escape(table['baseline'])}" if table["baseline"] else "")
                 + "}", r"\begin{tabular}{l" + "r" * (len(metrics) + 1) + "}", r"\hline",
                 "Model & Seeds & " + " & ".join(_latex_escape(m) for m in metrics) + r" \\", r"\hline"]
        for row in table["rows"]:
            if not row["seeds"]:
                cells = [rf"\multicolumn{{{len(metrics)}}}{{l}}{{failed: {_latex_escape(str(row['error'])[:80])}}}"]
            else:
                cells = [_cell_text(row["metrics"][m], lambda t: rf"\textbf{{{t}}}", r"$\pm$",
                                    lambda p: rf" {{\scriptsize (p={_latex_escape(p)})}}")
                         if m in row["metrics"] else "--" for m in metrics]
            lines.append(f"{_latex_escape(_model_text(row))} & {_seeds_text(row)} & " + " & ".join(cells) + r" \\")
        lines += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def build_tables(out_dir, baseline=None, split="test", command=None):
    """Rebuild `comparison.md`, `.csv` and `.tex` in `out_dir` from every run in its `runs.jsonl`."""
    jsonl = os.path.join(out_dir, RUNS_FILE)
    records = load_records(jsonl)
    if not records:
        raise FileNotFoundError(f"No runs to tabulate: {jsonl} is missing or empty. Run a comparison first.")
    summary = summarize(records, baseline=baseline, split=split)
    seeds = sorted({r["seed"] for r in records})
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    devices = sorted({r.get("device") or "not recorded" for r in records if "error" not in r})
    header = "\n".join(
        [f"## Comparison ({split} split)", ""]
        + ([f"- command: `{command}`"] if command else [])
        + [f"- seeds: {', '.join(map(str, seeds))}",
           f"- config files: {', '.join(sorted({f for r in records for f in r.get('config_files', [])})) or 'none'}",
           f"- commits: {', '.join(commits) or 'unknown'}",
           f"- device{'s' if len(devices) > 1 else ''}: {'; '.join(devices)}",
           "- cells: mean ± sample std over seeds; best mean of each column in **bold**"]
    )
    files = {"jsonl": jsonl}
    for ext, text in (("md", to_markdown(summary, header)), ("tex", to_latex(summary))):
        files[ext] = os.path.join(out_dir, f"{TABLE_STEM}.{ext}")
        with open(files[ext], "w", encoding="utf-8") as f:
            f.write(text)
    files["csv"] = os.path.join(out_dir, f"{TABLE_STEM}.csv")
    write_csv(summary, files["csv"])
    if any(row["metrics"] for table in summary for row in table["rows"]):  # bar chart of the valid metric over seeds
        from recbole_reason.figures import comparison_figure, save_figure

        metric = next((str(r["eval_setup"]["valid_metric"]).lower() for r in records
                       if (r.get("eval_setup") or {}).get("valid_metric")), None)
        files.update(save_figure(comparison_figure(summary, metric), os.path.join(out_dir, TABLE_STEM)))
    return files, summary
