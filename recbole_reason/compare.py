"""Fair side-by-side comparison of plugin models and RecBole baselines, over seeds, with significance tests.

    from recbole_reason.compare import compare
    compare(["SASRec", "ReaRec", "LARES"], ["ml-100k"], seeds=[2020, 2021, 2022], baseline="SASRec",
            config_file_list=["my.yaml"], out_dir="results/ml-100k")

Every (model, dataset, seed) run goes through the same path as the run script and tuning
(`quick_start.objective_function`: the plugin's Config, dataset, split, trainer and RecBole's Evaluator) with the
same config files and config dict; only the seed and a variant's own overrides differ. RecBole seeds the split,
the sampler and the model from `seed`, so two models run with one seed see the same split and are paired.

Each run appends one JSON line to `<out_dir>/runs.jsonl` and stores its per-user test values beside it
(`per_user/*.npz`, `recbole_reason.per_user`); the tables (`comparison.md`, `.csv`, `.tex`, `_paired.csv`) are
rebuilt from every line of that file, so a table can be filled in parts (one model or one dataset per call) and
rebuilt without running anything (`build_tables`). A run already in the file with the same setup is not run again;
a run interrupted mid-way continues from its last epoch (its own checkpoint folder, `run_checkpoint_dir`). `jobs`
runs several at once in worker processes. Named variants and controls: `recbole_reason.variants`.

Table: mean ± sample std over seeds for every metric of the run's config (`metrics` x `topk`), the best mean of
each column in bold (smallest for RecBole's smaller-is-better metrics), and for every model but the baseline the
p-value of a ONE-SIDED paired t-test over the seeds both ran, H1: the model is better than the baseline
(`alternative='greater'`, or `'less'` for smaller-is-better metrics). Below it, the paired tests over users of each
model against the baseline and against its control (Wilcoxon, paired t, bootstrap interval, relative difference).
A model that fails is a row with its error.
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
from recbole_reason.per_user import PerUserRecorder, save_per_user

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


def format_relative(rel_diff):
    """A relative difference in percent; "n/a" where it is undefined (the reference's mean is 0)."""
    return "n/a" if rel_diff is None or math.isnan(rel_diff) else f"{100 * rel_diff:+.1f}%"


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
    """Models as variant dicts {'label', 'model', 'config', and optionally 'control_of', 'select', 'from_run_of' +
    'attributes', 'note'} (see recbole_reason.variants). An entry is a name ('SASRec', or a catalogued label like
    'ReaRec-K0'), a tuple (label, model[, overrides]) or such a dict. Labels must be unique; a control's model, an
    inference-time row's trained run, must be among the models."""
    from recbole_reason.variants import variant

    out = []
    for entry in models:
        if isinstance(entry, str):
            out.append(variant(entry) or {"label": entry, "model": entry, "config": {}})
        elif isinstance(entry, dict):
            out.append({**entry, "label": entry.get("label", entry["model"]), "config": dict(entry.get("config") or {})})
        elif isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
            out.append({"label": entry[0], "model": entry[1], "config": dict(entry[2]) if len(entry) == 3 else {}})
        else:
            raise ValueError(f"a model is a name, (label, model, overrides) or {{'label', 'model', 'config'}}; got {entry!r}")
    labels = [v["label"] for v in out]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"model labels must be unique, got {duplicated} more than once: give variants their own label")
    if not out:
        raise ValueError("compare needs at least one model")
    for v in out:
        if v.get("from_run_of") and v["from_run_of"] not in labels:
            raise ValueError(f"{v['label']} is evaluated on the trained model of {v['from_run_of']}: add "
                             f"{v['from_run_of']} to the models")
    return out


# -- running ---------------------------------------------------------------------------------------------------------
def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _file_digest(files):
    """The config files' names and contents (not their folders: the same files in another checkout or on another
    machine, e.g. the GPU plan's, are the same setup)."""
    digest = hashlib.sha1()
    for file in files or []:
        digest.update(os.path.basename(file).encode())
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


def run_checkpoint_dir(out_dir, label, dataset, seed, setup):
    """Where one run keeps its best-model checkpoint and per-epoch resume state: its own folder (parallel runs never
    share one), found again by a later call to resume the run if it was interrupted. Under saved/ (git-ignored)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{label}_{dataset}_{seed}_{setup}")
    root = hashlib.sha1(os.path.abspath(out_dir).encode()).hexdigest()[:8]
    return os.path.join("saved", "compare", f"{os.path.basename(os.path.abspath(out_dir))}-{root}", name)


def interrupted_run_state(checkpoint_dir):
    """The resume state an interrupted run left in its checkpoint folder (the newest), or None."""
    from recbole_reason.checkpoint import RESUME_SUFFIX

    if not os.path.isdir(checkpoint_dir):
        return None
    states = [os.path.join(checkpoint_dir, f) for f in os.listdir(checkpoint_dir) if f.endswith(RESUME_SUFFIX)]
    return max(states, key=os.path.getmtime) if states else None


def run_one(label, model, dataset, seed, config_file_list=None, config_dict=None, overrides=None, saved=True,
            out_dir=None, eval_rows=None, meta=None):
    """Train and test one model once; returns its JSONL record (with `error` instead of results if it failed)
    followed by the records of its inference-time rows (`eval_rows`: {'label', 'attributes', ...}).
    With `out_dir` the run checkpoints into its own folder (`run_checkpoint_dir`) and, if an earlier call was
    interrupted there, continues from its last finished epoch (`CheckpointMixin.resume`: same numbers as an
    uninterrupted run)."""
    from recbole.utils import init_seed

    from recbole_reason.config import Config
    from recbole_reason.distributed import init_rank_logger
    from recbole_reason.quick_start import _build

    setup = setup_key(model, overrides, config_file_list, config_dict)
    run_dict = {**(config_dict or {}), **(overrides or {}), "model": model, "dataset": dataset, "seed": seed}
    checkpoint_dir = run_checkpoint_dir(out_dir, label, dataset, seed, setup) if out_dir and saved else None
    if checkpoint_dir:  # a runtime setting (checkpoint.RUNTIME_SETTINGS): not part of the setup key
        run_dict["checkpoint_dir"] = checkpoint_dir
    record = {"label": label, "model": model, "dataset": dataset, "seed": seed, "setup": setup,
              "config_files": [os.path.abspath(f) for f in config_file_list or []],
              "overrides": _jsonable(overrides or {}), "config_dict": _jsonable(config_dict or {}),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), **(meta or {})}
    derived = []
    start = time.perf_counter()
    try:
        config = Config(config_dict=run_dict, config_file_list=config_file_list)
        record["eval_setup"] = _jsonable({key: config[key] for key in EVAL_SETUP_KEYS})
        record["device"] = device_name(config["device"])
        init_seed(config["seed"], config["reproducibility"])
        init_rank_logger(config)
        _, (train_data, valid_data, test_data), _, trainer = _build(config)
        resume_from = interrupted_run_state(checkpoint_dir) if checkpoint_dir else None
        if resume_from:
            trainer.resume(resume_from)
            record["resumed_from"] = resume_from
        # verbose: each epoch's loss, valid score and time go to the log at the config's `state` (INFO; WARNING: none)
        best_valid_score, best_valid = trainer.fit(train_data, valid_data, verbose=True, saved=saved, show_progress=False)
        with PerUserRecorder(trainer) as recorder:  # the test's per-user values, beside the averaged result
            test = trainer.evaluate(test_data, load_best_model=saved)
        record.update(test={k: float(v) for k, v in (test or {}).items()},
                      valid={k: float(v) for k, v in (best_valid or {}).items()},
                      saved_model_file=trainer.saved_model_file if saved else None,
                      epochs=len(trainer.train_loss_dict), fit_seconds=time.perf_counter() - start)
        if out_dir and recorder.last is not None:
            record["per_user_file"] = _save_run_per_user(out_dir, record, recorder.last)
        extra = trainer.post_evaluate(test_data) if hasattr(trainer, "post_evaluate") else {}
        record["extra"] = _jsonable(extra)
        for row in eval_rows or []:  # inference-time controls of the same trained model
            derived.append(_evaluate_row(row, record, trainer, test_data, out_dir))
        if checkpoint_dir:  # finished: a later --rerun starts afresh instead of resuming a finished run
            for state in filter(None, [interrupted_run_state(checkpoint_dir)]):
                os.remove(state)
    except Exception as error:  # a failed model is a row of the table; the other runs go on
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=-8)
    record["seconds"] = time.perf_counter() - start
    record["commit"] = git_commit()
    for row in derived:
        row.update(seconds=record["seconds"], commit=record["commit"])
    return [record] + derived


PER_USER_DIR = "per_user"


def _save_run_per_user(out_dir, record, values):
    """The run's per-user test values as <out_dir>/per_user/<label>_<dataset>_<seed>_<setup>.npz; returns the path
    relative to out_dir (what the record stores, so the folder can move)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   f"{record['label']}_{record['dataset']}_{record['seed']}_{record['setup']}") + ".npz"
    os.makedirs(os.path.join(out_dir, PER_USER_DIR), exist_ok=True)
    save_per_user(os.path.join(out_dir, PER_USER_DIR, name), values)
    return os.path.join(PER_USER_DIR, name)


def _evaluate_row(row, record, trainer, test_data, out_dir):
    """Evaluate the trained model of `record` again with some model attributes changed (e.g. REG4Rec's corp='off',
    LARES's test_recurrence=1) and return that row's record; the attributes are restored afterwards."""
    model = trainer.model
    missing = [name for name in row["attributes"] if not hasattr(model, name)]
    if missing:
        raise AttributeError(f"{row['label']}: {type(model).__name__} has no attribute {missing} to set at evaluation")
    kept = {name: getattr(model, name) for name in row["attributes"]}
    try:
        for name, value in row["attributes"].items():
            setattr(model, name, value)
        with PerUserRecorder(trainer) as recorder:
            test = trainer.evaluate(test_data, load_best_model=False)
    finally:
        for name, value in kept.items():
            setattr(model, name, value)
    derived = {**{k: v for k, v in record.items() if k not in ("per_user_file", "extra")},
               "label": row["label"], "from_run_of": record["label"], "eval_attributes": _jsonable(row["attributes"]),
               "test": {k: float(v) for k, v in test.items()}, "valid": {}, "extra": {}}
    for key in ("control_of", "select", "note"):
        derived.pop(key, None)
        if row.get(key):
            derived[key] = row[key]
    if out_dir and recorder.last is not None:
        derived["per_user_file"] = _save_run_per_user(out_dir, derived, recorder.last)
    return derived


def load_records(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(models, datasets, seeds, config_file_list=None, config_dict=None, baseline=None, out_dir="compare_results",
            split="test", saved=True, rerun=False, show_progress=None, command=None, jobs=1, threads=None):
    """Run every model on every dataset with every seed (same config files and dict), append the runs to
    `<out_dir>/runs.jsonl` and rebuild the tables from it. Returns {'records': this call's records,
    'summary': per-dataset rows, 'files': {'md', 'csv', 'tex', 'jsonl', ...}}.

    models: names ('SASRec', 'ReaRec', catalogued labels like 'ReaRec-K0') or variants (see `normalize_models`);
    baseline: the label every other model is tested against (must be among `models`, or None for no test); rerun:
    run again even if the file already holds a successful run with the same setup; show_progress: a tqdm bar over
    the runs (default: the config's `show_progress`); jobs: runs at once, each in its own process with `threads`
    torch threads (default: the cores over jobs) and its log in <out_dir>/logs/. Records are appended as runs end,
    so an interrupted call resumes: finished runs are skipped, a run stopped mid-way continues from its last epoch."""
    variants = normalize_models(models)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    seeds = [int(seed) for seed in ([seeds] if isinstance(seeds, (int, str)) else seeds)]
    if not datasets or not seeds:
        raise ValueError(f"compare needs at least one dataset and one seed, got datasets={datasets}, seeds={seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (each is one paired run), got {seeds}")
    labels = [v["label"] for v in variants]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the models {labels}: add it, or pass baseline=None")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1 (runs at once), got {jobs!r}")
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, RUNS_FILE)
    trained = [v for v in variants if not v.get("from_run_of")]
    if show_progress is None:
        show_progress = _config_show_progress(trained[0]["model"], datasets[0], config_file_list, config_dict)

    done = {(r["label"], r["dataset"], r["seed"], r.get("setup")) for r in load_records(jsonl) if "error" not in r}
    todo = []
    for dataset in datasets:  # seed by seed: a plan cut short has every model of its first seeds
        for seed in seeds:
            for v in trained:  # a run is done when it and its inference-time rows are in the file
                setup = setup_key(v["model"], v["config"], config_file_list, config_dict)
                rows = [row for row in variants if row.get("from_run_of") == v["label"]]
                if rerun or any((label, dataset, seed, setup) not in done for label in [v["label"]] + [r["label"] for r in rows]):
                    todo.append(dict(label=v["label"], model=v["model"], dataset=dataset, seed=seed,
                                     config_file_list=config_file_list, config_dict=config_dict, overrides=v["config"],
                                     saved=saved, out_dir=out_dir, eval_rows=rows, meta=_meta(v)))
    from tqdm import tqdm

    records = []
    bar = tqdm(total=len(todo), desc="compare", unit="run", disable=not show_progress)
    for run_records in _run_all(todo, jobs, threads, out_dir):
        records += run_records
        with open(jsonl, "a", encoding="utf-8") as f:  # only this process writes: lines never interleave
            for record in run_records:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix_str(f"{run_records[0]['label']} on {run_records[0]['dataset']}, seed {run_records[0]['seed']}")
        bar.update()
    bar.close()
    files, summary = build_tables(out_dir, baseline=baseline, split=split, command=command)
    return {"records": records, "summary": summary, "files": files}


def _meta(v):
    """What a record keeps of its variant besides the setup: the table's roles and notes."""
    return {key: v[key] for key in ("control_of", "select", "note") if v.get(key)}


def _run_all(todo, jobs, threads, out_dir):
    """Yield each run's records as it ends: in this process (jobs=1), or in `jobs` worker processes."""
    if jobs == 1 or len(todo) <= 1:
        if threads:
            import torch

            torch.set_num_threads(threads)
        for job in todo:
            yield run_one(**job)
        return
    import concurrent.futures
    import multiprocessing

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    # spawn: a fresh interpreter per worker (no forked torch / CUDA state), each with its own threads and log
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, job, threads, os.path.join(log_dir, _run_name(job) + ".log")) for job in todo]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _run_name(job):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{job['label']}_{job['dataset']}_{job['seed']}")


def _worker(job, threads, log_file):
    """One run in a worker process: its own torch threads, its stdout / stderr in its log file."""
    import sys

    import torch

    torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the settings come through config_dict
    with open(log_file, "a", encoding="utf-8") as log:
        sys.stdout, sys.stderr = log, log
        try:
            return run_one(**job)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _config_show_progress(model, dataset, config_file_list, config_dict):
    from recbole_reason.config import Config

    try:
        config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        return bool(config["show_progress"])
    except Exception:  # an unknown model fails again, with its message, as a table row
        return False


# -- tables ----------------------------------------------------------------------------------------------------------
def select_on_valid(records):
    """Rows of one `select` group (a model tuned over a grid, e.g. ReaRec's tau) -> extra records labelled with
    the group's name, copies of the member with the best mean validation score (the run's `valid_metric`) over
    its seeds, `selected` naming it. A group whose members are all controls of another group's members becomes
    that group's control. Groups with fewer than two members add nothing."""
    members = {}
    for r in records:
        if r.get("select") and "error" not in r and r.get("valid"):
            members.setdefault((r["dataset"], r["select"]), {}).setdefault(r["label"], []).append(r)
    group_of = {(dataset, label): group for (dataset, group), labels in members.items() for label in labels}
    extra = []
    for (dataset, group), labels in members.items():
        if len(labels) < 2:
            continue
        metric = str(next(iter(labels.values()))[0]["eval_setup"]["valid_metric"]).lower()
        sign = -1 if smaller_is_better(metric) else 1
        best = max(labels, key=lambda label: sign * np.mean([r["valid"].get(metric, -sign * np.inf) for r in labels[label]]))
        controls = {group_of.get((dataset, r.get("control_of"))) for runs in labels.values() for r in runs}
        for r in labels[best]:
            copy = {**r, "label": group, "selected": best, "select": None}
            copy.pop("control_of", None)
            if len(controls) == 1 and None not in controls:
                copy["control_of"] = next(iter(controls))
            extra.append(copy)
    return records + extra


PAIRED_MD_METRICS = ("ndcg@10", "recall@10")  # the Markdown table's per-user tests (the CSV holds every metric)


def summarize(records, baseline=None, split="test", out_dir=None):
    """Per dataset: the metric columns and one row per model label (first-seen order) with mean, std, p-value and
    best flag per metric, its role (control of which model, member chosen on valid) and note; failed models carry
    their error. Of repeated runs of a (label, dataset, seed), the last successful one counts. With `out_dir` (where
    the runs' per-user files are) `paired` lists the per-user paired tests of every model against the baseline
    and against its control (`per_user.paired_over_seeds`), with the seed-level t-test of the same pair."""
    records = select_on_valid(records)
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
            meta = runs[-1] if runs else {}
            row = {"label": label, "baseline": label == baseline, "seeds": [r["seed"] for r in runs],
                   "failed_seeds": sorted({r["seed"] for r in errors}), "error": errors[-1]["error"] if errors else None,
                   "control_of": meta.get("control_of"), "selected": meta.get("selected"), "note": meta.get("note"),
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
        setup_of = {r["label"]: json.dumps(r.get("eval_setup"), sort_keys=True) for r in latest.values()}
        reference = setup_of.get(baseline) or max(setups, key=list(setup_of.values()).count) if setups else None
        table = {"dataset": dataset, "metrics": metrics, "rows": rows, "split": split, "baseline": baseline,
                 "mixed_setup": len(setups) > 1, "paired": [],
                 "odd_setup": sorted({label for label, setup in setup_of.items() if setup != reference})}
        if out_dir and split == "test":
            table["paired"] = _paired_tests(rows, latest, baseline, out_dir)
        summary.append(table)
    return summary


def _paired_tests(rows, latest, baseline, out_dir):
    """Per-user paired tests (pooled over seeds) of each model against the baseline and against its control."""
    from recbole_reason.per_user import USER_ID, load_per_user, paired_over_seeds

    def per_user_runs(label):
        return {seed: load_per_user(os.path.join(out_dir, r["per_user_file"])) for (lab, seed), r in latest.items()
                if lab == label and r.get("per_user_file") and os.path.isfile(os.path.join(out_dir, r["per_user_file"]))}

    pairs = [(row["label"], baseline, "baseline") for row in rows if baseline and row["label"] != baseline]
    pairs += [(row["control_of"], row["label"], "control") for row in rows if row["control_of"]]
    tests = []
    for model, reference, kind in pairs:
        model_runs, reference_runs = per_user_runs(model), per_user_runs(reference)
        if not model_runs or not reference_runs:
            continue
        for metric in [k for k in next(iter(model_runs.values())) if k != USER_ID]:
            if not all(metric in v for v in reference_runs.values()):
                continue
            smaller = smaller_is_better(metric)
            test = paired_over_seeds(model_runs, reference_runs, metric, alternative="less" if smaller else "greater")
            if test is None:
                continue
            seed_means = [(latest[(model, s)]["test"][metric], latest[(reference, s)]["test"][metric]) for s in test["seeds"]]
            test.update(model=model, reference=reference, kind=kind, metric=metric,
                        seed_ttest_p=one_sided_paired_ttest(*zip(*seed_means), smaller_better=smaller))
            tests.append(test)
    return tests


def _notes(table):
    notes = []
    if table["baseline"]:
        notes.append(f"p: one-sided paired t-test over seeds against {table['baseline']}, H1: the model is better "
                     "(greater mean; smaller for smaller-is-better metrics).")
    if table["mixed_setup"]:
        odd = ", ".join(table.get("odd_setup") or []) or "some rows"
        notes.append("WARNING: these runs do not share one evaluation setup (eval_args / metrics / topk / valid_metric / "
                     f"MAX_ITEM_LIST_LENGTH differ; {odd} differ from the baseline or the most common setup): those rows "
                     "are not comparable with the others. See eval_setup in runs.jsonl.")
    return notes


def _cell_text(cell, bold, plus_minus, p_text):
    text = f"{cell['mean']:.{DECIMALS}f}{plus_minus}{cell['std']:.{DECIMALS}f}"
    text = bold(text) if cell.get("best") else text
    return text + (p_text(format_p(cell["p"])) if cell.get("p") is not None else "")


def _model_text(row):
    roles = (["baseline"] if row["baseline"] else []) + ([f"control of {row['control_of']}"] if row.get("control_of") else [])
    roles += [f"= {row['selected']}, best on valid"] if row.get("selected") else []
    return row["label"] + (f" ({'; '.join(roles)})" if roles else "")


def _signed(value, digits=DECIMALS):
    return f"{value:+.{digits}f}"


def paired_markdown(table, metrics=PAIRED_MD_METRICS):
    """The per-user paired tests of a table as Markdown lines (the metrics of `metrics` that were tested)."""
    tests = [t for t in table.get("paired", []) if t["metric"] in metrics]
    pairs = list(dict.fromkeys((t["model"], t["reference"], t["kind"]) for t in tests))
    tests.sort(key=lambda t: (pairs.index((t["model"], t["reference"], t["kind"])), metrics.index(t["metric"])))
    if not tests:
        return []
    lines = ["", "**Paired tests over users** (per-user test values averaged over the seeds both ran, paired by user; "
             "one-sided, H1: the model is better than the reference; scipy's Wilcoxon signed-rank and paired t over "
             "users, percentile-bootstrap 95% interval of the mean difference; last column: paired t over seed means)",
             "", "| model | against | metric | seeds | users | rel. diff | mean diff [95% CI] | Wilcoxon p | t p (users) | t p (seeds) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for t in tests:
        lines.append(f"| {t['model']} | {t['reference']}{' (control)' if t['kind'] == 'control' else ''} | {t['metric']} | "
                     f"{len(t['seeds'])} | {t['n']} | {format_relative(t['rel_diff'])} | {_signed(t['mean_diff'])} "
                     f"[{_signed(t['ci_low'])}, {_signed(t['ci_high'])}] | {format_p(t['wilcoxon_p'])} | "
                     f"{format_p(t['ttest_p'])} | {format_p(t['seed_ttest_p'])} |")
    return lines


def write_paired_csv(summary, path):
    import csv

    fields = ["dataset", "model", "reference", "kind", "metric", "seeds", "n", "mean_model", "mean_baseline",
              "mean_diff", "rel_diff", "ci_low", "ci_high", "wilcoxon_p", "ttest_p", "seed_ttest_p"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for table in summary:
            for test in table.get("paired", []):
                writer.writerow({**test, "dataset": table["dataset"], "seeds": " ".join(map(str, test["seeds"])),
                                 "seed_ttest_p": "" if test["seed_ttest_p"] is None else test["seed_ttest_p"]})


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
        notes = [row for row in table["rows"] if row.get("note")]
        lines += ["", "Settings that differ from the paper:"] + [f"- {row['label']}: {escape(row['note'])}" for row in notes] if notes else []
        lines += paired_markdown(table)
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
    summary = summarize(records, baseline=baseline, split=split, out_dir=out_dir)
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
    if any(table["paired"] for table in summary):
        files["paired_csv"] = os.path.join(out_dir, f"{TABLE_STEM}_paired.csv")
        write_paired_csv(summary, files["paired_csv"])
    if any(row["metrics"] for table in summary for row in table["rows"]):  # bar chart of the valid metric over seeds
        from recbole_reason.figures import comparison_figure, save_figure

        metric = next((str(r["eval_setup"]["valid_metric"]).lower() for r in records
                       if (r.get("eval_setup") or {}).get("valid_metric")), None)
        files.update(save_figure(comparison_figure(summary, metric), os.path.join(out_dir, TABLE_STEM)))
    return files, summary
