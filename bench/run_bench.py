"""Benchmark plugin models against RecBole baselines: quality over seeds, speed as ratios to SASRec.

    python bench/run_bench.py --models SASRec,ReaRec-ERL,ReaRec-PRL --datasets ml-100k --seeds 2020,2021,2022 \
        --config_files bench/configs/gpu.yaml --tag rearec_ml-100k_gpu

Every run appends one JSON line to bench/results/<tag>.jsonl (so a table can be filled in parts: one model or
one dataset per call); the Markdown table bench/results/<tag>.md is rebuilt from all lines of the tag, with the
command, device, commit and seeds. Quality: mean and std over seeds, one-sided paired t-test against SASRec
(H1: model > SASRec) over seeds, and over users: each run's per-user test values are stored in
bench/results/<tag>_per_user/ and NDCG@10 is tested against SASRec's per user (Wilcoxon signed-rank and paired t,
one-sided, pooled over the seeds both ran). Speed: fit time, time per epoch and full-sort inference time per 1,000 users, each also
as a ratio to SASRec's on the same dataset in the same file.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from recbole_reason.compare import device_name, log_valid_scores  # noqa: E402  (after the path insert)
from recbole_reason.per_user import PerUserRecorder  # noqa: E402

# name -> (RecBole/plugin model, config overrides). Baselines and plugin variants share every other setting.
VARIANTS = {
    "SASRec": ("SASRec", {}),
    "GRU4Rec": ("GRU4Rec", {}),
    "BERT4Rec": ("BERT4Rec", {}),
    "ReaRec-ERL": ("ReaRec", {"rearec_mode": "erl"}),
    "ReaRec-PRL": ("ReaRec", {"rearec_mode": "prl"}),
    "ReaRec-K0": ("ReaRec", {"reason_step": 0, "rearec_mode": "erl"}),
    "LARES-SPT": ("LARES", {"rl_epochs": 0}),
    "LARES": ("LARES", {}),
    "R2ec-warmup": ("R2ec", {"recpo_epochs": 0}),
    "R2ec": ("R2ec", {}),
    "REG4Rec-SFT": ("REG4Rec", {"pars_epochs": 0}),
    "REG4Rec": ("REG4Rec", {}),
    "REG4Rec-PARS": ("REG4Rec", {"msra_window": 1}),
}
SEEDS = []
QUALITY = ["ndcg@10", "recall@10", "ndcg@20", "recall@20"]

# A multi-stage run also reports its first stage's best model (evaluated on test at the stage switch, before the
# post-training starts) as the first-stage-only variant: e.g. one LARES run gives the LARES-SPT and LARES rows.
# The first stage is identical in both variants for a seed, so this halves the cost of the table.
STAGE_ROWS = {"LARES": "LARES-SPT", "R2ec": "R2ec-warmup", "REG4Rec": "REG4Rec-SFT"}
# Inference-time ablations of the final model: (row name, attribute, value) evaluated after the test.
EVAL_ROWS = {"REG4Rec": [("REG4Rec-noCORP", "corp", "off")], "REG4Rec-PARS": [("REG4Rec-PARS-noCORP", "corp", "off")]}


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def full_sort_seconds(model, eval_data, device):
    """Wall time of full-sort scoring (model forward + scores for all items) over every user of eval_data."""
    model.eval()
    users = 0
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for interaction, _, _, _ in eval_data:
            model.full_sort_predict(interaction.to(device))
            users += len(interaction)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, users


def run_one(variant, dataset, seed, config_files, overrides):
    """Train and test one variant; returns its record plus the records of its STAGE_ROWS / EVAL_ROWS variants."""
    from recbole.utils import init_seed

    from recbole_reason.config import Config
    from recbole_reason.distributed import init_rank_logger
    from recbole_reason.quick_start import _build

    model_name, variant_config = VARIANTS[variant]
    config_dict = {**overrides, **variant_config, "seed": seed}
    config = Config(model=model_name, dataset=dataset, config_file_list=config_files, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_rank_logger(config)  # each variant its own log file and TensorBoard folder
    _, (train_data, valid_data, test_data), model, trainer = _build(config)
    if config["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = {"model": model_name, "dataset": dataset, "seed": seed,
            "config": {k: config[k] for k in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "epochs", "train_batch_size", "learning_rate") if k in config}}
    stage_records = []
    per_user = {}  # row name -> per-user test values (recbole_reason.per_user)
    start = time.perf_counter()
    if variant in STAGE_ROWS and getattr(trainer, "post_epochs", 0) > 0:
        start_post_training = trainer.start_post_training

        def evaluate_first_stage(data):
            stage_seconds = time.perf_counter() - start
            with PerUserRecorder(trainer) as recorder:
                result = trainer.evaluate(test_data, load_best_model=False)
            per_user[STAGE_ROWS[variant]] = recorder.last
            seconds, users = full_sort_seconds(trainer.model, test_data, config["device"])
            epochs = len(trainer.train_loss_dict)
            stage_records.append({**base, "variant": STAGE_ROWS[variant], "from_run_of": variant,
                                  "test": {k: float(v) for k, v in result.items()},
                                  "fit_seconds": stage_seconds, "epochs": epochs, "seconds_per_epoch": stage_seconds / max(epochs, 1),
                                  "best_epoch": max(epochs - 1 - trainer.cur_step * trainer.eval_step, 0),
                                  "inference_seconds_per_1000_users": 1000 * seconds / max(users, 1),
                                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if config["device"].type == "cuda" else None,
                                  "extra": {}})
            return start_post_training(data)

        trainer.start_post_training = evaluate_first_stage
    valid_log = log_valid_scores(trainer)  # every validation: the post-training stage's own epochs too
    best_valid_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=config["show_progress"])
    fit_seconds = time.perf_counter() - start
    with PerUserRecorder(trainer) as recorder:
        test = trainer.evaluate(test_data, load_best_model=True)
    per_user[variant] = recorder.last
    inference_seconds, users = full_sort_seconds(trainer.model, test_data, config["device"])
    epochs = len(trainer.train_loss_dict)
    extra = trainer.post_evaluate(test_data) if hasattr(trainer, "post_evaluate") else {}
    if getattr(trainer, "item_tokens", None) is not None:  # REG4Rec's tokenizer report
        extra["tokenizer"] = {k: trainer.item_tokens.stats[k] for k in ("collision_rate_before", "collision_rate_after", "code_usage")}
    if model_name == "R2ec" and seed == min(SEEDS):
        example_users = [str(u) for u in test_data._dataset.field2id_token[config["USER_ID_FIELD"]][1:4]]
        extra["reasoning_examples"] = trainer.model.explain(test_data._dataset, example_users)
    record = {**base, "variant": variant,
              "test": {k: float(v) for k, v in test.items()},
              "best_valid": {k: float(v) for k, v in (best_valid or {}).items()},
              "fit_seconds": fit_seconds, "epochs": epochs, "seconds_per_epoch": fit_seconds / max(epochs, 1),
              "best_epoch": max(epochs - 1 - trainer.cur_step * trainer.eval_step, 0), "valid_log": valid_log,
              "inference_seconds_per_1000_users": 1000 * inference_seconds / max(users, 1),
              "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if config["device"].type == "cuda" else None,
              "extra": json.loads(json.dumps(extra, default=float))}
    for row, attribute, value in EVAL_ROWS.get(variant, []):
        kept = getattr(trainer.model, attribute)
        setattr(trainer.model, attribute, value)
        try:
            with PerUserRecorder(trainer) as recorder:
                result = trainer.evaluate(test_data, load_best_model=False)
            per_user[row] = recorder.last
            seconds, users = full_sort_seconds(trainer.model, test_data, config["device"])
        finally:
            setattr(trainer.model, attribute, kept)
        stage_records.append({**record, "variant": row, "from_run_of": variant, "extra": {},
                              "test": {k: float(v) for k, v in result.items()},
                              "inference_seconds_per_1000_users": 1000 * seconds / max(users, 1)})
    return [record] + stage_records, per_user


def save_run_per_user(results_dir, tag, record, values):
    """<tag>_per_user/<variant>_<dataset>_<seed>.npz beside <tag>.jsonl; returns its path relative to results_dir."""
    from recbole_reason.per_user import save_per_user

    path = os.path.join(f"{tag}_per_user", f"{record['variant']}_{record['dataset']}_{record['seed']}.npz")
    os.makedirs(os.path.join(results_dir, f"{tag}_per_user"), exist_ok=True)
    save_per_user(os.path.join(results_dir, path), values)
    return path


def user_paired_cell(runs, base_runs, results_dir, metric="ndcg@10"):
    """'rel. diff (Wilcoxon p, paired t p)' of a variant's per-user NDCG@10 against SASRec's, pooled over the seeds
    both ran (recbole_reason.per_user.paired_over_seeds); '–' without per-user files."""
    from recbole_reason.per_user import load_per_user, paired_over_seeds

    def load(rows):
        return {r["seed"]: load_per_user(os.path.join(results_dir, r["per_user_file"])) for r in rows
                if r.get("per_user_file") and os.path.isfile(os.path.join(results_dir, r["per_user_file"]))}
    test = paired_over_seeds(load(runs), load(base_runs), metric)
    if test is None:
        return "–"
    from recbole_reason.tables import format_p, format_relative

    return f"{format_relative(test['rel_diff'])} ({format_p(test['wilcoxon_p'])}, {format_p(test['ttest_p'])}; {test['n']} users)"


def summarize(records, header, results_dir=None):
    # mean ± std and the one-sided paired t-test are recbole_reason.tables', as in run_compare.py's tables
    from recbole_reason.tables import mean_std, one_sided_paired_ttest

    lines = [header, ""]
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        base = {r["seed"]: r for r in rows if r["variant"] == "SASRec"}
        base_speed = {key: np.mean([r[key] for r in base.values()]) for key in ("fit_seconds", "seconds_per_epoch", "inference_seconds_per_1000_users")} if base else None
        lines += [f"### {dataset}", "",
                  "| model | seeds | " + " | ".join(QUALITY) + " | p (NDCG@10 > SASRec) | users: NDCG@10 vs SASRec (Wilcoxon p, t p) | fit s (x SASRec) | epochs (best) | s/epoch (x SASRec) | infer s/1k users (x SASRec) | peak GPU MiB |",
                  "|---|---:|" + "---:|" * (len(QUALITY) + 7)]
        best = {m: max(np.mean([r["test"][m] for r in rows if r["variant"] == v]) for v in variants) for m in QUALITY}
        for variant in variants:
            runs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
            cells = []
            for metric in QUALITY:
                mean, std = mean_std([r["test"][metric] for r in runs])
                cell = f"{mean:.4f} ± {std:.4f}"
                cells.append(f"**{cell}**" if np.isclose(mean, best[metric]) else cell)
            paired = [(r["test"]["ndcg@10"], base[r["seed"]]["test"]["ndcg@10"]) for r in runs if r["seed"] in base]
            if variant == "SASRec" or len(paired) < 2:
                p_value = "–"
            else:
                ours, theirs = zip(*paired)
                p_value = f"{one_sided_paired_ttest(ours, theirs):.3f}"  # H1: NDCG@10 > SASRec's

            users = "–" if variant == "SASRec" or not results_dir else user_paired_cell(runs, list(base.values()), results_dir)

            def speed(key):
                value = np.mean([r[key] for r in runs])
                return f"{value:.2f} ({value / base_speed[key]:.2f}x)" if base_speed else f"{value:.2f}"

            gpu = [r["peak_gpu_mib"] for r in runs if r["peak_gpu_mib"]]
            lines.append(
                f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {p_value} | {users} | {speed('fit_seconds')} | "
                f"{np.mean([r['epochs'] for r in runs]):.0f} ({np.mean([r['best_epoch'] for r in runs]):.0f}) | "
                f"{speed('seconds_per_epoch')} | {speed('inference_seconds_per_1000_users')} | "
                + (f"{np.mean(gpu):.0f} |" if gpu else "– |")
            )
        lines.append("")
        lines += within_run_sections(rows, results_dir)
        lines += extras_sections(rows)
    return "\n".join(lines)


def within_run_sections(rows, results_dir):
    """What a multi-stage run's own rows say: its post-training stage against its first stage, and each
    inference-time ablation against the model it ablates, paired over users (one-sided, H1: the full model is better,
    pooled over the seeds), plus each seed's valid scores per stage (`valid_log`: did post-training raise valid?)."""
    from recbole_reason.per_user import load_per_user, paired_over_seeds
    from recbole_reason.tables import format_p, format_relative

    def load(variant):
        return {r["seed"]: load_per_user(os.path.join(results_dir, r["per_user_file"])) for r in rows
                if r["variant"] == variant and r.get("per_user_file")
                and os.path.isfile(os.path.join(results_dir, r["per_user_file"]))}

    pairs = list(dict.fromkeys((r["from_run_of"], r["variant"]) for r in rows if r.get("from_run_of")))
    lines = []
    tests = [(full, part, paired_over_seeds(load(full), load(part), "ndcg@10")) for full, part in pairs] if results_dir else []
    tests = [t for t in tests if t[2] is not None]
    if tests:
        lines += ["Within each run (per-user test NDCG@10, averaged over the seeds both rows ran, paired by user; one-sided, "
                  "H1: the first row is better):", "",
                  "| model | against | users | rel. diff | mean diff [95% CI] | Wilcoxon p | t p |", "|---|---|---:|---:|---|---:|---:|"]
        for full, part, t in tests:
            lines.append(f"| {full} | {part} | {t['n']} | {format_relative(t['rel_diff'])} | {t['mean_diff']:+.4f} "
                         f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {format_p(t['wilcoxon_p'])} | {format_p(t['ttest_p'])} |")
        lines.append("")
    # an inference-time row shares its run's training (and copies its valid log): one line per run
    logged = [r for r in rows if not r.get("from_run_of") and len({stage for stage, _ in r.get("valid_log", [])}) > 1]
    if logged:
        lines += ["Valid score per stage (`valid_metric`; the first stage's best, then every post-training epoch):", "",
                  "| model | seed | first stage (best) | post-training epochs | raised |", "|---|---:|---:|---|---|"]
        for r in sorted(logged, key=lambda r: (r["variant"], r["seed"])):
            first_stage = r["valid_log"][0][0]
            first = max(v for stage, v in r["valid_log"] if stage == first_stage)
            post = [v for stage, v in r["valid_log"] if stage != first_stage]
            lines.append(f"| {r['variant']} | {r['seed']} | {first:.4f} | {', '.join(f'{v:.4f}' for v in post)} | "
                         f"{'yes' if max(post) > first else 'no'} |")
        lines.append("")
    return lines


def extras_sections(rows):
    """Per-dataset extras: LARES's depth-scaling table, REG4Rec's tokenizer report, R2ec's example reasoning."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant and r.get("extra")]
        depth_runs = [r["extra"]["depth_results"] for r in runs if r["extra"].get("depth_results")]
        if depth_runs:
            lines += [f"**{variant}: test metrics at each test depth T (the trained model, no retraining; mean ± std over "
                      f"{len(depth_runs)} seeds)**", "", "| T | ndcg@10 | recall@10 | ndcg@20 | recall@20 |", "|---:|---:|---:|---:|---:|"]
            for depth in depth_runs[0]:
                cells = []
                for metric in QUALITY:
                    values = [d[depth][metric] for d in depth_runs if depth in d]
                    cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}")
                lines.append(f"| {depth} | " + " | ".join(cells) + " |")
            lines.append("")
        tokenizer = [r["extra"]["tokenizer"] for r in runs if r["extra"].get("tokenizer")]
        if tokenizer:
            usage = np.mean([t["code_usage"] for t in tokenizer], axis=0)
            lines += [f"**{variant}: MPQ tokenizer** (mean over {len(tokenizer)} seeds): collision rate before resolution "
                      f"{np.mean([t['collision_rate_before'] for t in tokenizer]):.4f}, after "
                      f"{np.mean([t['collision_rate_after'] for t in tokenizer]):.4f}; code usage per codebook (share of "
                      f"codes used) {', '.join(f'{u:.3f}' for u in usage)}", ""]
        examples = [r["extra"]["reasoning_examples"] for r in runs if r["extra"].get("reasoning_examples")]
        for example_set in examples[:1]:
            lines += [f"**{variant}: example reasoning chains** (seed {runs[0]['seed']}, greedy decoding, test users)", ""]
            for item in example_set:
                lines += [f"- user {item['user']}: history (last 5) {item['history'][-5:]}",
                          f"  - reasoning: {' '.join(item['reasoning'])}",
                          f"  - top items: {item['top_items']}; target: {item['target']}"]
            lines.append("")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="SASRec,ReaRec-ERL,ReaRec-PRL", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--datasets", default="ml-100k")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--config_files", default=os.path.join(REPO, "bench", "configs", "gpu.yaml"))
    parser.add_argument("--data_path", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--tag", required=True, help="results go to bench/results/<tag>.jsonl and <tag>.md")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=value (values as in a YAML config file)")
    parser.add_argument("--rebuild", action="store_true", help="no runs: only rebuild <tag>.md from <tag>.jsonl")
    args = parser.parse_args()
    SEEDS[:] = [int(s) for s in args.seeds.split(",")]

    overrides = {"data_path": args.data_path, "state": "WARNING", "show_progress": False}
    from recbole_reason.cli import parse_setting
    overrides.update(parse_setting(item) for item in args.set)
    config_files = args.config_files.split()
    results_dir = os.path.join(REPO, "bench", "results")
    os.makedirs(results_dir, exist_ok=True)
    jsonl = os.path.join(results_dir, f"{args.tag}.jsonl")
    command = "python " + " ".join(sys.argv)
    for dataset in ([] if args.rebuild else args.datasets.split(",")):
        for variant in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.time()
                try:
                    records, per_user = run_one(variant, dataset, seed, config_files, overrides)
                except Exception as error:  # a failed model is reported, the others still run
                    records, per_user = [{"variant": variant, "dataset": dataset, "seed": seed, "error": repr(error)}], {}
                for record in records:
                    if per_user.get(record["variant"]) is not None:
                        record["per_user_file"] = save_run_per_user(results_dir, args.tag, record, per_user[record["variant"]])
                    record.update(command=command, device=device_name(), commit=git_commit(), wall_seconds=time.time() - started)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(json.dumps({k: record.get(k) for k in ("variant", "dataset", "seed", "test", "fit_seconds", "error")}), flush=True)

    records = [json.loads(line) for line in open(jsonl)]
    if args.rebuild and records:  # the header names the command that made the runs, not this one
        command = records[0]["command"]
    failed = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    header = (f"## {args.tag}\n\n- command: `{command}`\n- device: {records[0]['device'] if records else '?'}\n"
              f"- commits: {', '.join(sorted({r['commit'] for r in records}))}\n"
              f"- seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in records}))}\n"
              + (f"- config files: {', '.join(os.path.relpath(f, REPO) for f in config_files)}; overrides: {args.set}\n"
                 if not args.rebuild else "")
              + "".join(f"- FAILED {r['variant']} on {r['dataset']} seed {r['seed']}: {r['error']}\n" for r in failed))
    with open(os.path.join(results_dir, f"{args.tag}.md"), "w") as f:
        f.write(summarize(records, header, results_dir))
    print(open(os.path.join(results_dir, f"{args.tag}.md")).read())


if __name__ == "__main__":
    main()
