"""Does ReaRec's latent reasoning help each backbone? Each backbone with and without reasoning, paired over users.

    python bench/run_backbones.py --datasets ml-100k --seeds 2020,2021,2022 --backbones sasrec,bert4rec,gru4rec \
        --config_files bench/configs/cpu.yaml --tag backbones_ml-100k_cpu --epochs=1 ...

For every backbone B two rows: `B+0` = ReaRec with `rearec_backbone: B, reason_step: 0` (the plain backbone: tested
weight for weight equal to RecBole's B), the control, and `B+<mode>` = the same settings with `reason_step` K and
`rearec_mode` (default erl). Same seed = same split, sampler and initialisation of every shared layer, so the two
rows are paired. Each run appends one JSON line to bench/results/<tag>/runs.jsonl and saves its per-user test
values (recbole_reason.per_user) as <tag>/per_user/<row>_<dataset>_<seed>.npz; the table <tag>/backbones.md is
rebuilt from all of them: mean and sample std over seeds per row, and per backbone the per-user paired test of the
reasoning row against its control (per-user values averaged over the seeds first: one-sided Wilcoxon and paired t,
H1: reasoning is better; bootstrap 95% interval of the mean difference). Extra `--key=value` go to every run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METRICS = ["ndcg@10", "recall@10", "ndcg@20", "recall@20"]


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def rows_for(backbones, reason_step, mode):
    """(label, overrides, control label) per row: the control first, then its reasoning row."""
    rows = []
    for backbone in backbones:
        control = f"{backbone}+0"
        rows.append((control, {"rearec_backbone": backbone, "reason_step": 0, "rearec_mode": mode}, None))
        rows.append((f"{backbone}+{mode}", {"rearec_backbone": backbone, "reason_step": reason_step, "rearec_mode": mode},
                     control))
    return rows


def run_one(label, overrides, dataset, seed, config_files, config_dict, out_dir):
    from recbole.utils import init_seed

    from recbole_reason.compare import device_name
    from recbole_reason.config import Config
    from recbole_reason.per_user import per_user_metrics, save_per_user
    from recbole_reason.quick_start import _build

    settings = {**config_dict, **overrides, "seed": seed}
    config = Config(model="ReaRec", dataset=dataset, config_file_list=config_files, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    started = time.time()
    _, (train_data, valid_data, test_data), _, trainer = _build(config)
    best_valid, valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=True, show_progress=False)
    test_result, per_user = per_user_metrics(trainer, test_data, load_best_model=True)
    seconds = time.time() - started
    os.makedirs(os.path.join(out_dir, "per_user"), exist_ok=True)
    per_user_file = os.path.join(out_dir, "per_user", f"{label}_{dataset}_{seed}.npz")
    save_per_user(per_user_file, per_user)
    return {
        "label": label, "model": "ReaRec", "dataset": dataset, "seed": seed, "overrides": overrides,
        "config_files": config_files, "config_dict": config_dict,
        "test": {k: float(v) for k, v in test_result.items()}, "valid": {k: float(v) for k, v in valid_result.items()},
        "seconds": seconds, "commit": git_commit(), "device": device_name(config["device"]),
        "per_user": os.path.relpath(per_user_file, out_dir),
    }


def build_table(out_dir, command=None):
    import numpy as np

    from recbole_reason.tables import format_relative, mean_std
    from recbole_reason.per_user import align, load_per_user, paired_test, pool_over_seeds

    runs = [json.loads(line) for line in open(os.path.join(out_dir, "runs.jsonl"), encoding="utf-8")]
    labels = list(dict.fromkeys(run["label"] for run in runs))
    datasets = list(dict.fromkeys(run["dataset"] for run in runs))
    lines = [f"# ReaRec over backbones, with and without latent reasoning ({', '.join(datasets)})", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Commits: {', '.join(sorted({r['commit'] for r in runs}))}; device: {'; '.join(sorted({r['device'] for r in runs}))}",
              f"Seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}", "",
              "## Test metrics, mean ± sample std over seeds", "",
              "| dataset | row | seeds | " + " | ".join(METRICS) + " | seconds/run |",
              "|---|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for dataset in datasets:
        for label in labels:
            mine = [r for r in runs if r["label"] == label and r["dataset"] == dataset]
            if not mine:
                continue
            cells = []
            for metric in METRICS:
                mean, std = mean_std([r["test"][metric] for r in mine])
                cells.append(f"{mean:.4f} ± {std:.4f}")
            lines.append(f"| {dataset} | {label} | {len(mine)} | " + " | ".join(cells)
                         + f" | {np.mean([r['seconds'] for r in mine]):.0f} |")
    lines += ["", "## Reasoning row against its control, paired over users (per-user values averaged over seeds)", "",
              "One-sided (H1: reasoning better). rel = relative mean difference; CI = bootstrap 95% interval of the "
              "mean difference.", "",
              "| dataset | row | control | metric | users | mean diff | rel | Wilcoxon p | t-test p | 95% CI |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for dataset in datasets:
        for run in {r["label"]: r for r in runs if r["dataset"] == dataset and r.get("control")}.values():
            label, control = run["label"], run["control"]
            seeds = sorted({r["seed"] for r in runs if r["label"] == label and r["dataset"] == dataset}
                           & {r["seed"] for r in runs if r["label"] == control and r["dataset"] == dataset})
            if not seeds:
                continue

            def pooled(row):
                files = {r["seed"]: r["per_user"] for r in runs if r["label"] == row and r["dataset"] == dataset}
                return pool_over_seeds([load_per_user(os.path.join(out_dir, files[seed])) for seed in seeds])

            model_values, control_values = pooled(label), pooled(control)
            for metric in ("ndcg@10", "recall@10"):
                a, b, users = align(model_values, control_values, metric)
                test = paired_test(a, b, alternative="greater")
                lines.append(f"| {dataset} | {label} | {control} | {metric} | {test['n']} | {test['mean_diff']:+.4f} | "
                             f"{format_relative(test['rel_diff'])} | {test['wilcoxon_p']:.3g} | {test['ttest_p']:.3g} | "
                             f"[{test['ci_low']:+.4f}, {test['ci_high']:+.4f}] |")
    path = os.path.join(out_dir, "backbones.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="ml-100k")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--backbones", default="sasrec,bert4rec,gru4rec")
    parser.add_argument("--reason_step", type=int, default=2, help="K of the reasoning rows")
    parser.add_argument("--mode", default="erl", help="rearec_mode of every row (the control's only matters for K=0)")
    parser.add_argument("--config_files", default=None)
    parser.add_argument("--tag", default="backbones_ml-100k_cpu")
    parser.add_argument("--rebuild", action="store_true", help="only rebuild the table")
    args, rest = parser.parse_known_args(argv)
    command = "python bench/run_backbones.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]
    from recbole_reason.compare import cli_config_overrides

    out_dir = os.path.join(REPO, "bench", "results", args.tag)
    os.makedirs(out_dir, exist_ok=True)
    if not args.rebuild:
        config_dict = cli_config_overrides(rest)
        config_files = args.config_files.split() if args.config_files else None
        runs_file = os.path.join(out_dir, "runs.jsonl")
        done = set()
        if os.path.isfile(runs_file):
            done = {(r["label"], r["dataset"], r["seed"]) for r in map(json.loads, open(runs_file, encoding="utf-8"))}
        for dataset in [d for d in args.datasets.split(",") if d]:
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                for label, overrides, control in rows_for(args.backbones.split(","), args.reason_step, args.mode):
                    if (label, dataset, seed) in done:
                        continue
                    record = run_one(label, overrides, dataset, seed, config_files, config_dict, out_dir)
                    record.update(control=control, command=command)
                    with open(runs_file, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(f"{label} {dataset} seed {seed}: {record['test']} ({record['seconds']:.0f} s)", flush=True)
    print(open(build_table(out_dir, command), encoding="utf-8").read())


if __name__ == "__main__":
    main()
