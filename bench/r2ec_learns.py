"""Issue 18's CPU check of R2ec (tiny backbone) against SASRec on ml-100k, per seed, in one process.

    python bench/r2ec_learns.py --seeds 2020,2021,2022 --tag r2ec_learns_ml-100k_cpu --set user_inter_num_interval=[20,40]
    python bench/r2ec_learns.py --models R2ec --tag <control> --r2ec recpo_epochs=0 ...   # a control, then
    python bench/r2ec_learns.py --rebuild --tag <tag> --baseline_tags <control>           # shown beside <tag>
    python bench/r2ec_learns.py --models R2ec --first_stage_from <dir> --tag <tag> ...     # RecPO from saved warm-ups
    python bench/r2ec_learns.py --models R2ec --first_stage_from <dir> --post_loss first_stage --tag <control> ...

Per seed: SASRec and R2ec (warm-up, then RecPO) on the same split; records CPU process seconds of each fit (the
budget), valid NDCG@10 of R2ec's warm-up and RecPO stages, test metrics, per-user test values (paired test over
users against SASRec, pooled over seeds), and the reasoning-content control (generated vs constant vs random
reasoning of the same lengths) on test. Writes bench/results/<tag>.{jsonl,md} and per-user .npz files; a reading written
by hand after the run goes in bench/results/<tag>.reading.md, which the .md includes (so `--rebuild` keeps it); checkpoints go to
bench/results/<tag>/saved/<seed>/, so that one process per seed (same --tag) never shares a checkpoint name
(RecBole names them by the second they were made).

`--first_stage_from DIR`: R2ec's RecPO stage alone (`PostTrainingTrainer.fit_post_training_from`), from the warm-up
checkpoint in DIR/<seed>/ (the oldest R2ec-*.pth: a run with recpo_epochs=0), so that RecPO and its control start from
the same weights; fit CPU seconds are then the post stage's only. `--post_loss first_stage` is that control: the
warm-up's own loss trained under RecPO's set-up (fresh optimizer at recpo_learning_rate, recpo_clip_grad_norm,
recpo_dropout_prob, the same epochs and selection on valid), so that a rise of valid can be put on RecPO's objective
rather than on more training at a lower rate.
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


def run_seed(model_name, seed, overrides, out_dir, first_stage_from=None, post_loss="post"):
    """first_stage_from: {seed: R2ec warm-up checkpoint} (`--first_stage_from`), or None."""
    from recbole.utils import init_seed

    from recbole_reason.compare import device_name, log_valid_scores
    from recbole_reason.config import Config
    from recbole_reason.depth_study import content_control_results, reasoning_diversity
    from recbole_reason.per_user import per_user_metrics, save_per_user
    from recbole_reason.quick_start import _build

    config = Config(model=model_name, dataset="ml-100k", config_file_list=[os.path.join(REPO, "bench/configs/cpu.yaml")],
                    config_dict={**overrides.get("all", {}), **overrides.get(model_name, {}), "seed": seed,
                                 "checkpoint_dir": os.path.join(out_dir, "saved", str(seed)), "save_resume_state": False})
    init_seed(seed, config["reproducibility"])
    _, (train_data, valid_data, test_data), model, trainer = _build(config)
    valid_log = log_valid_scores(trainer, "ndcg@10")  # RecPO's own epochs, not the best so far
    if post_loss == "first_stage" and model_name == "R2ec":  # the control: the warm-up's loss, under the post stage's set-up
        trainer.post_training_loss = trainer.model.calculate_loss
    first_stage = first_stage_from and model_name == "R2ec" and first_stage_from[seed]
    cpu, wall = time.process_time(), time.perf_counter()
    if first_stage:
        trainer.fit_post_training_from(first_stage, train_data, valid_data, saved=True)
    else:
        trainer.fit(train_data, valid_data, saved=True)
    record = {"model": model_name, "seed": seed, "device": device_name(), "fit_cpu_s": time.process_time() - cpu,
              "fit_wall_s": time.perf_counter() - wall, "train_rows": len(train_data.dataset),
              "test_users": None, "config": {k: config[k] for k in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "epochs",
                                                                    "train_batch_size", "learning_rate")}}
    if model_name == "R2ec":
        record.update(first_stage_from=first_stage and os.path.relpath(first_stage, REPO), post_loss=post_loss)
    result, values = per_user_metrics(trainer, test_data, load_best_model=True)
    record["test"] = {k: float(v) for k, v in result.items()}
    record["test_users"] = int(len(values["user_id"]))
    save_per_user(os.path.join(out_dir, f"{model_name}_{seed}.npz"), values)
    if model_name == "R2ec":
        record["valid_log"] = valid_log
        record["stage_valid_ndcg@10"] = {stage: max(v for s, v in valid_log if s == stage) for stage, _ in valid_log}
        results, per_content, tests = content_control_results(model, trainer, test_data, "ndcg@10")
        record["content_control"] = {"ndcg@10": {c: float(r["ndcg@10"]) for c, r in results.items()}, "paired": tests}
        record["reasoning_diversity"] = reasoning_diversity(model, test_data)
        users = [str(u) for u in test_data._dataset.field2id_token[config["USER_ID_FIELD"]][1:4]]
        record["reasoning_examples"] = model.explain(test_data._dataset, users)
    return record


def paired_line(label, r2ec_runs, r2ec_dir, base_runs, base_dir):
    """R2ec - a baseline, per-user NDCG@10 averaged over the seeds both ran, paired over users."""
    from recbole_reason.per_user import align, load_per_user, paired_test, pool_over_seeds

    seeds = {r["seed"] for r in r2ec_runs} & {r["seed"] for r in base_runs}
    pool = lambda runs, d: pool_over_seeds([load_per_user(os.path.join(d, f"{r['model']}_{r['seed']}.npz"))  # noqa: E731
                                            for r in runs if r["seed"] in seeds])
    a, b, _ = align(pool(r2ec_runs, r2ec_dir), pool(base_runs, base_dir), "ndcg@10")
    test = paired_test(a, b)
    return (f"Paired over users (per-user NDCG@10 averaged over the seeds both ran), R2ec - {label}: "
            f"mean diff {test['mean_diff']:+.4f}, one-sided Wilcoxon p = {test['wilcoxon_p']:.3g}, t-test p = "
            f"{test['ttest_p']:.3g}, 95% CI [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}], n = {test['n']}.")


def summarize(records, out_dir, command, reading="", baselines=()):
    """baselines: (tag, records, out_dir) of other runs of this script on the same seeds (SASRec given R2ec's CPU
    time, R2ec with RecPO off...), each model of each shown as one more row and paired against this tag's R2ec."""
    # records from before the device was recorded per run were summarised on the machine that ran them
    devices = sorted({r.get("device", "CPU (x86_64, 2 cores, 1 torch threads)") for r in records})
    seeds = sorted({r["seed"] for r in records})
    of = lambda runs, m: sorted((r for r in runs if r["model"] == m), key=lambda r: r["seed"])  # noqa: E731
    by = lambda m: of(records, m)  # noqa: E731
    lines = ["## R2ec (tiny backbone) vs SASRec, ml-100k, CPU", "",
             f"- command: `{command}`", f"- device: {'; '.join(devices)}", f"- commit: {records[0]['commit']}",
             f"- seeds: {', '.join(map(str, seeds))}", "", *([reading.strip(), ""] if reading.strip() else []),
             "**CPU figures** (no GPU was lent to this task). Test split, RecBole full ranking.", "",
             "| model | seeds | NDCG@10 (mean ± std) | Recall@10 | fit CPU s (mean) | train rows |", "|---|---:|---:|---:|---:|---:|"]
    others = [(f"{m}, `{tag}`", of(runs, m), d) for tag, runs, d in baselines for m in ("SASRec", "R2ec") if of(runs, m)]
    for label, runs in [("SASRec", by("SASRec")), ("R2ec", by("R2ec"))] + [o[:2] for o in others]:
        if not runs:
            continue
        nd = [r["test"]["ndcg@10"] for r in runs]
        rc = [r["test"]["recall@10"] for r in runs]
        lines.append(f"| {label} | {len(runs)} | {np.mean(nd):.4f} ± {np.std(nd, ddof=1) if len(nd) > 1 else 0:.4f} | "
                     f"{np.mean(rc):.4f} | {np.mean([r['fit_cpu_s'] for r in runs]):.0f} | {runs[0]['train_rows']} |")
    r2ec = by("R2ec")
    if r2ec:
        for label, runs, d in ([("SASRec", by("SASRec"), out_dir)] if by("SASRec") else []) + others:
            lines += ["", paired_line(label, r2ec, out_dir, runs, d)]
        post = "RecPO" if all(r.get("post_loss", "post") == "post" for r in r2ec) else "control stage (warm-up loss)"
        if any(r.get("first_stage_from") for r in r2ec):
            lines += ["", f"R2ec's stage 2 started from saved warm-ups (`--first_stage_from`): its fit CPU s are stage 2's only."]
        lines += ["", f"| seed | valid NDCG@10 per epoch | warm-up valid (best) | {post} valid (best) | {post} >= warm-up | "
                  "test generated | constant (diff, Wilcoxon p) | random (diff, Wilcoxon p) | "
                  "distinct test reasonings (most common's share) |", "|---:|---|---:|---:|---|---:|---|---|---:|"]
        for r in r2ec:
            sv, cc = r["stage_valid_ndcg@10"], r["content_control"]
            w, p = sv.get("warmup", float("nan")), sv.get("recpo")
            cell = lambda c: f"{cc['ndcg@10'][c]:.4f} ({cc['paired'][c]['mean_diff']:+.4f}, {cc['paired'][c]['wilcoxon_p']:.3g})"  # noqa: E731
            recpo, raised = ("–", "– (no RecPO)") if p is None else (f"{p:.4f}", "yes" if p >= w else "no")
            per_epoch = ", ".join(f"{stage} {v:.4f}" for stage, v in r.get("valid_log", [])) or "–"
            diversity = r.get("reasoning_diversity")
            distinct = f"{diversity['distinct']} ({diversity['top_share']:.2f})" if diversity else "–"
            lines.append(f"| {r['seed']} | {per_epoch} | {w:.4f} | {recpo} | {raised} | "
                         f"{cc['ndcg@10']['generated']:.4f} | {cell('constant')} | {cell('random')} | {distinct} |")
        lines += ["", "Reasoning examples (first seed, greedy, test users):", ""]
        for e in r2ec[0]["reasoning_examples"]:
            lines.append(f"- user {e['user']}: history (last 5) {e['history'][-5:]}; reasoning: {' '.join(e['reasoning'])}; "
                         f"top items {e['top_items'][:3]}; target {e['target']}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--models", default="SASRec,R2ec")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="key=value for both models")
    parser.add_argument("--sasrec", nargs="*", default=[], help="key=value for SASRec only")
    parser.add_argument("--r2ec", nargs="*", default=[], help="key=value for R2ec only")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--first_stage_from", default=None,
                        help="a folder of <seed>/R2ec-*.pth warm-up checkpoints: R2ec runs its RecPO stage alone from them")
    parser.add_argument("--post_loss", choices=("post", "first_stage"), default="post",
                        help="first_stage: the control, the warm-up's loss under RecPO's set-up (with --first_stage_from)")
    parser.add_argument("--baseline_tags", nargs="*", default=[],
                        help="other runs of this script on the same seeds, shown beside this tag and paired against its R2ec")
    args = parser.parse_args()
    missing = [t for t in args.baseline_tags if not os.path.exists(os.path.join(REPO, "bench", "results", f"{t}.jsonl"))]
    if missing:  # before hours of training, not after
        parser.error(f"--baseline_tags {' '.join(missing)}: no bench/results/<tag>.jsonl; run them first (e.g. with --models SASRec).")
    if args.post_loss == "first_stage" and not args.first_stage_from:
        parser.error("--post_loss first_stage needs --first_stage_from (the control starts from the saved warm-up)")
    first_stages = None
    if args.first_stage_from and not args.rebuild:  # every seed's checkpoint before hours of training, not after
        from recbole_reason.compare import saved_checkpoints

        try:
            first_stages = {int(s): saved_checkpoints(os.path.join(args.first_stage_from, s), "R2ec",
                                                      "train that seed's warm-up first (recpo_epochs=0, "
                                                      "checkpoint_dir=<dir>/<seed>)")[0] for s in args.seeds.split(",")}
        except FileNotFoundError as error:
            parser.error(f"--first_stage_from: {error}")
    command = "python bench/r2ec_learns.py " + " ".join(sys.argv[1:])
    sys.argv = sys.argv[:1]
    import yaml

    parse = lambda pairs: {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}  # noqa: E731
    overrides = {"all": parse(args.set), "SASRec": parse(args.sasrec), "R2ec": parse(args.r2ec)}
    out_dir = os.path.join(REPO, "bench", "results", args.tag)
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(REPO, "bench", "results", f"{args.tag}.jsonl")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(1)
    if not args.rebuild:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for model in args.models.split(","):
                record = {**run_seed(model, seed, overrides, out_dir, first_stages, args.post_loss),
                          "commit": commit, "command": command}
                with open(jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, default=float) + "\n")
                print(model, seed, record["test"]["ndcg@10"], record.get("stage_valid_ndcg@10"), flush=True)
                records = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
                write_summary(records, out_dir, args.tag, args.baseline_tags)
    write_summary([json.loads(line) for line in open(jsonl, encoding="utf-8")], out_dir, args.tag, args.baseline_tags)


def write_summary(records, out_dir, tag, baseline_tags=()):
    results = os.path.join(REPO, "bench", "results")
    baselines = []
    for baseline in baseline_tags:
        path = os.path.join(results, f"{baseline}.jsonl")
        if not os.path.exists(path):
            raise SystemExit(f"--baseline_tags {baseline}: {path} does not exist; run it first (e.g. with --models SASRec).")
        baselines.append((baseline, [json.loads(line) for line in open(path, encoding="utf-8")], os.path.join(results, baseline)))
    reading_path = os.path.join(results, f"{tag}.reading.md")
    reading = open(reading_path, encoding="utf-8").read() if os.path.exists(reading_path) else ""
    with open(os.path.join(results, f"{tag}.md"), "w", encoding="utf-8") as f:
        f.write(summarize(records, out_dir, records[0]["command"], reading, baselines))


if __name__ == "__main__":
    main()
