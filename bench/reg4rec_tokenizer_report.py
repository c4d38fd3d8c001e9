"""REG4Rec tokenizer report (issue 15): per dataset and item-vector source, the collision rate before resolution,
code coherence (share of an item's 10 nearest collaborative neighbours sharing >= 1 token with it) and code usage.

    python bench/reg4rec_tokenizer_report.py --datasets amazon-beauty,amazon-toys --data_path /work/shared/data \
        --sources features,cf --tag reg4rec_tokenizer_cpu

Collaborative neighbours are the cosine neighbours of the `cf` source's own item vectors (the embeddings of the
early-stopped SASRec-style ID model, stored in its token cache), so every source is judged against the same
neighbours. Writes bench/results/<tag>.jsonl (one line per dataset x source) and bench/results/<tag>.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from recbole.data import data_preparation  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_reason import Config, create_dataset  # noqa: E402
from recbole_reason.compat import load_checkpoint  # noqa: E402
from recbole_reason.data import mpq_tokenizer as mpq  # noqa: E402


def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="amazon-beauty,amazon-toys")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--sources", default="features,cf")
    parser.add_argument("--set", nargs="*", default=[], help="key=value config overrides")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--tag", default="reg4rec_tokenizer_cpu")
    parser.add_argument("--cache_dir", default="/tmp/reg4rec_tokenizer_report")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python " + " ".join(sys.argv)
    sys.argv = sys.argv[:1]
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = parse_value(value)
    sources = [s for s in args.sources.split(",") if s]
    order = ["cf"] + [s for s in sources if s != "cf"]  # cf first: its vectors define the neighbours
    rows = []
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    jsonl = os.path.join(REPO, "bench", "results", f"{args.tag}.jsonl")
    for dataset in [d for d in args.datasets.split(",") if d]:
        neighbours = None
        for source in order:
            config_dict = {"seed": args.seed, "state": "ERROR", "show_progress": False, "item_feature_source": source,
                           "tokenizer_cache_dir": args.cache_dir, **overrides}
            if args.data_path:
                config_dict["data_path"] = args.data_path
            config = Config(model="REG4Rec", dataset=dataset, config_dict=config_dict)
            init_seed(args.seed, True)
            train_data, _, _ = data_preparation(config, create_dataset(config))
            started = time.time()
            tokens = mpq.build_item_tokens(config, train_data._dataset)
            seconds = time.time() - started
            vectors = load_checkpoint(tokens.cache_file)["item_vectors"]
            if source == "cf":
                neighbours = vectors
            stats = tokens.stats
            row = {
                "dataset": dataset, "source": source, "items": int(tokens.item2tokens.size(0) - 1),
                "M": int(tokens.item2tokens.size(1)), "D": int(tokens.token_cat.size(1)),
                "collision_rate_before": stats["collision_rate_before"],
                "collision_rate_after": stats["collision_rate_after"],
                "coherence_cf_neighbours@10": mpq.code_coherence(tokens.item2tokens, neighbours, 10),
                "coherence_own_vectors@10": stats["code_coherence"],
                "code_usage": stats["code_usage"], "code_perplexity": stats["code_perplexity"],
                "build_seconds": round(seconds, 1), "from_cache": tokens.from_cache,
                "command": command, "commit": commit, "device": "CPU, 1 torch thread", "seed": args.seed,
                "overrides": overrides,
            }
            # chance level for every source: the same codes shuffled over items
            shuffled = tokens.item2tokens.clone()
            shuffled[1:] = shuffled[1:][torch.randperm(shuffled.size(0) - 1)]
            row["coherence_shuffled_codes@10"] = mpq.code_coherence(shuffled, neighbours, 10)
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    lines = [f"## {args.tag}", "", f"- command: `{command}`", f"- commit: {commit}; device: CPU (1 torch thread); seed {args.seed}",
             "- coherence@10: share of an item's 10 nearest neighbours (cosine of the cf source's item vectors = "
             "collaborative) that share >= 1 token with it; chance = the same codes shuffled over items", "",
             "| dataset | source | items | M x D | collision before | after | coherence@10 (cf neighbours) | shuffled codes | code usage | perplexity | build s |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['source']} | {r['items']} | {r['M']} x {r['D']} | {r['collision_rate_before']:.4f} | "
            f"{r['collision_rate_after']:.4f} | {r['coherence_cf_neighbours@10']:.4f} | "
            f"{r.get('coherence_shuffled_codes@10', float('nan')):.4f} | {', '.join(f'{u:.2f}' for u in r['code_usage'])} | "
            f"{', '.join(f'{p:.0f}' for p in r['code_perplexity'])} | "
            f"{'cache, ' if r['from_cache'] else ''}{r['build_seconds']} |")  # a cache hit's seconds are the load's
    with open(os.path.join(REPO, "bench", "results", f"{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
