"""How many different reasonings the R2ec models of `bench/r2ec_learns.py` runs write for the test users (greedy, as
evaluated): `depth_study.reasoning_diversity` on each seed's selected checkpoint.

    python bench/r2ec_reasoning_diversity.py --tags r2ec_v5_warmup_only_ml-100k_cpu r2ec_full_v6_ml-100k_cpu

A policy that writes one string for every user says nothing about the user, whatever its NDCG; the content control
(constant / random tokens of the same lengths) then cannot tell generated reasoning apart either. Reads the newest
`R2ec-*.pth` of bench/results/<tag>/saved/<seed>/ (gitignored: it exists where the run ran); appends one JSON line
per checkpoint to bench/results/r2ec_reasoning_diversity_ml-100k_cpu.jsonl and rewrites the .md.
"""

import argparse
import glob
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "bench", "results", "r2ec_reasoning_diversity_ml-100k_cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", nargs="+", required=True)
    args = parser.parse_args()
    command = "python bench/r2ec_reasoning_diversity.py " + " ".join(sys.argv[1:])
    sys.argv = sys.argv[:1]
    from recbole_reason.compare import device_name, git_commit
    from recbole_reason.depth_study import _load_for_evaluation, reasoning_diversity

    torch.set_num_threads(1)
    for tag in args.tags:
        folders = sorted(glob.glob(os.path.join(REPO, "bench", "results", tag, "saved", "*")))
        if not folders:
            raise SystemExit(f"{tag}: no bench/results/{tag}/saved/<seed>/ here; run bench/r2ec_learns.py --tag {tag} first.")
        for folder in folders:
            checkpoint = sorted(glob.glob(os.path.join(folder, "R2ec-*.pth")))[-1]
            config, loaders, net, trainer = _load_for_evaluation(checkpoint, {"state": "ERROR"})
            trainer.load_model_weights(checkpoint)
            stats = reasoning_diversity(net, loaders["test"])
            stats["top"] = net.backbone.render(torch.tensor(stats["top"]), loaders["test"]._dataset)
            record = {"tag": tag, "seed": int(os.path.basename(folder)), "checkpoint": os.path.relpath(checkpoint, REPO),
                      **stats, "command": command, "commit": git_commit(), "device": device_name()}
            with open(OUT + ".jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(tag, record["seed"], stats, flush=True)
    records = [json.loads(line) for line in open(OUT + ".jsonl", encoding="utf-8")]
    lines = ["## R2ec: distinct greedy reasonings over the test users, ml-100k, CPU", "",
             f"- command: `{records[-1]['command']}`", f"- device: {records[-1]['device']}",
             f"- commit: {records[-1]['commit']}", "",
             "| run (tag) | seed | test users | distinct reasonings | share of the most common | most common |",
             "|---|---:|---:|---:|---:|---|"]
    for r in records:
        lines.append(f"| `{r['tag']}` | {r['seed']} | {r['users']} | {r['distinct']} | {r['top_share']:.2f} | "
                     f"{' '.join(r['top'])} |")
    with open(OUT + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
