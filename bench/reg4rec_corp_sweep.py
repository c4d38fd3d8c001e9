"""CORP settings on trained REG4Rec checkpoints (issue 15): valid and test NDCG@10 per setting, chosen on valid.

    python bench/reg4rec_corp_sweep.py --checkpoint_dirs /tmp/benchck/reg4rec_v3_{2020,2021,2022} --seeds 2020,2021,2022 \
        --tag reg4rec_corp_sweep_ml-100k_cpu --set MAX_ITEM_LIST_LENGTH=10 train_batch_size=512

Inference only: each checkpoint (the newest `REG4Rec-*.pth` of its folder, with its token cache beside it) is loaded
into a REG4Rec built from the same config, and evaluated with `corp: off`, `corp: rule` and `corp: user` at several
`corp_penalty` values. The setting with the best mean valid NDCG@10 over the seeds is then tested against `corp: off`
on test, paired over users (per-user values averaged over the seeds). Writes bench/results/<tag>.{json,md}.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SETTINGS = [("off", 0.0), ("rule", 0.0), ("user", 0.25), ("user", 0.5), ("user", 1.0), ("user", 2.0)]


def label(corp, penalty):
    return f"user, penalty {penalty:g}" if corp == "user" else corp


def sweep_checkpoint(checkpoint_dir, seed, overrides, data_path):
    from recbole.utils import init_seed

    from recbole_reason.compare import saved_checkpoints
    from recbole_reason.config import Config
    from recbole_reason.per_user import per_user_metrics
    from recbole_reason.quick_start import _build

    config = Config(model="REG4Rec", dataset="ml-100k", config_file_list=[os.path.join(REPO, "bench/configs/cpu.yaml")],
                    config_dict={**overrides, "seed": seed, "checkpoint_dir": checkpoint_dir, "data_path": data_path,
                                 "save_resume_state": False, "state": "ERROR"})
    init_seed(seed, config["reproducibility"])
    _, (train_data, valid_data, test_data), model, trainer = _build(config)
    checkpoints = saved_checkpoints(checkpoint_dir, "REG4Rec", "train it first (bench/run_bench.py)")
    trainer.load_model_weights(checkpoints[-1])
    rows = {}
    for corp, penalty in SETTINGS:
        model.corp, model.corp_penalty = corp, penalty
        valid = trainer.evaluate(valid_data, load_best_model=False)
        test, per_user = per_user_metrics(trainer, test_data)
        order = np.argsort(per_user["user_id"])  # the same users in every run: pair them by id
        rows[label(corp, penalty)] = {"valid": float(valid["ndcg@10"]), "test": float(test["ndcg@10"]),
                                      "users": per_user["user_id"][order].tolist(),
                                      "test_per_user": per_user["ndcg@10"][order].tolist()}
        print(seed, label(corp, penalty), rows[label(corp, penalty)]["valid"], rows[label(corp, penalty)]["test"], flush=True)
    return {"seed": seed, "checkpoint": checkpoints[-1], "rows": rows}


def report(runs, command):
    from recbole_reason.compare import device_name, git_commit
    from recbole_reason.per_user import paired_test

    names = [label(c, p) for c, p in SETTINGS]
    mean = lambda name, split: float(np.mean([r["rows"][name][split] for r in runs]))  # noqa: E731
    chosen = max((n for n in names if n != "off"), key=lambda n: mean(n, "valid"))
    per_user = lambda name: np.mean([r["rows"][name]["test_per_user"] for r in runs], axis=0)  # noqa: E731
    test = paired_test(per_user(chosen), per_user("off"))
    lines = ["## REG4Rec: CORP settings on trained checkpoints, ml-100k, CPU", "", f"- command: `{command}`",
             f"- device: {device_name()}; commit: {git_commit()}; seeds: {', '.join(str(r['seed']) for r in runs)}",
             "- inference only, on the final REG4Rec of each seed (after PARS); NDCG@10, RecBole full ranking", "",
             "| CORP | " + " | ".join(f"valid {r['seed']}" for r in runs) + " | valid mean | "
             + " | ".join(f"test {r['seed']}" for r in runs) + " | test mean |",
             "|---|" + "---:|" * (2 * len(runs) + 2)]
    for name in names:
        lines.append(f"| {name}{' (chosen on valid)' if name == chosen else ''} | "
                     + " | ".join(f"{r['rows'][name]['valid']:.4f}" for r in runs) + f" | {mean(name, 'valid'):.4f} | "
                     + " | ".join(f"{r['rows'][name]['test']:.4f}" for r in runs) + f" | {mean(name, 'test'):.4f} |")
    lines += ["", f"Chosen on valid: **{chosen}**. On test against `corp: off`, paired over {test['n']} users (per-user "
              f"NDCG@10 averaged over the seeds; one-sided, H1: CORP better): mean diff {test['mean_diff']:+.4f} "
              f"[95% CI {test['ci_low']:+.4f}, {test['ci_high']:+.4f}], Wilcoxon p = {test['wilcoxon_p']:.3g}, "
              f"t p = {test['ttest_p']:.3g}."]
    return "\n".join(lines) + "\n", {"chosen": chosen, "paired_vs_off": test}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dirs", nargs="+", required=True)
    parser.add_argument("--seeds", required=True, help="one per checkpoint folder, in the same order")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--data_path", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    parser.add_argument("--set", nargs="*", default=[], help="key=value config overrides the runs were trained with")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != len(args.checkpoint_dirs):
        parser.error(f"{len(args.checkpoint_dirs)} checkpoint folders but {len(seeds)} seeds: give one seed per folder")
    command = "python bench/reg4rec_corp_sweep.py " + " ".join(sys.argv[1:])
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)}
    sys.argv = sys.argv[:1]
    torch.set_num_threads(1)
    runs = [sweep_checkpoint(d, s, overrides, args.data_path) for d, s in zip(args.checkpoint_dirs, seeds)]
    markdown, summary = report(runs, command)
    out = os.path.join(REPO, "bench", "results", args.tag)
    with open(out + ".json", "w") as f:
        json.dump({"command": command, "runs": [{k: v for k, v in r.items()} for r in runs], **summary}, f)
    with open(out + ".md", "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
