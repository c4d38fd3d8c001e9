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
rebuilt without running anything (`recbole_reason.tables.build_tables`: what the tables hold, how they are written).
A run already in the file with the same setup is not run again; a run interrupted mid-way continues from its last
epoch (its own checkpoint folder, `run_checkpoint_dir`). `jobs` runs several at once in worker processes. Named
variants and controls: `recbole_reason.variants`.
"""

import datetime
import glob
import hashlib
import json
import os
import platform
import subprocess
import time
import traceback

import numpy as np

from recbole_reason.cli import parse_setting
from recbole_reason.per_user import PerUserRecorder, save_per_user
from recbole_reason.tables import RUNS_FILE, build_tables, load_records

# Settings that must be equal for runs to be comparable; recorded per run and checked when a table is built.
EVAL_SETUP_KEYS = ("eval_args", "metrics", "topk", "valid_metric", "MAX_ITEM_LIST_LENGTH", "train_neg_sample_args")
SPLITS = ("test", "valid")


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
    """What ran the run, for the tables: the GPU's name, or the CPU with its cores, torch threads and the vector
    kernels torch dispatches to (AVX2 and AVX512 round differently, so sampled rollouts can differ between machines)."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads, {torch.backends.cpu.get_cpu_capability()} kernels)")


def log_valid_scores(trainer, metric=None):
    """Record every validation of `trainer.fit` as (stage, score), in order, and return the (growing) list.
    RecBole keeps only the best valid result; this keeps each one, so a table can say whether a post-training
    stage raised valid (a PostTrainingTrainer names its stage; RecBole's own Trainer is 'supervised').
    `metric`: a key of the valid result (e.g. 'ndcg@10'); None = the trainer's valid_metric score."""
    log = []
    valid_epoch = trainer._valid_epoch

    def logged_valid_epoch(valid_data, show_progress=False):
        score, result = valid_epoch(valid_data, show_progress=show_progress)
        log.append((getattr(trainer, "stage", "supervised"), float(result[metric] if metric else score)))
        return score, result

    trainer._valid_epoch = logged_valid_epoch
    return log


def saved_checkpoints(checkpoint_dir, model, fix):
    """The `<model>-*.pth` checkpoints of a folder, oldest first; none: an error naming the folder and `fix`."""
    checkpoints = sorted(glob.glob(os.path.join(checkpoint_dir, f"{model}-*.pth")), key=os.path.getmtime)
    if not checkpoints:
        raise FileNotFoundError(f"no {model}-*.pth in {checkpoint_dir}: {fix}")
    return checkpoints


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
