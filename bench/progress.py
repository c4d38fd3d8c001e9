"""Where the unfinished runs of a comparison stand: epochs done, training loss, best valid result so far.

    python bench/progress.py --out_dir bench/results/converged_ml-100k_cpu     # writes <out_dir>/progress.md

Reads the per-epoch resume state each run of `run_compare.py` keeps in its own checkpoint folder
(`recbole_reason.compare.run_checkpoint_dir`) while it trains; a finished run is in runs.jsonl instead.
"""

import argparse
import datetime
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def progress_rows(out_dir):
    from recbole_reason.checkpoint import RESUME_SUFFIX
    from recbole_reason.compare import run_checkpoint_dir
    from recbole_reason.compat import load_checkpoint

    root = os.path.dirname(run_checkpoint_dir(out_dir, "x", "x", 0, "x"))
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*" + RESUME_SUFFIX))):
        state = load_checkpoint(path, map_location="cpu")
        losses = state["train_loss_dict"]
        rows.append({"run": os.path.basename(os.path.dirname(path)), "stage": state["stage"],
                     "epochs": state["epoch"] + 1, "evaluations_without_gain": state["cur_step"],
                     "loss": [float(losses[k]) for k in sorted(losses)],
                     "best_valid": {k: float(v) for k, v in (state["best_valid_result"] or {}).items()},
                     "saved": datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    rows = progress_rows(args.out_dir)
    lines = [f"## Unfinished runs of {args.out_dir} (from their resume states)", ""]
    from recbole_reason.compare import run_checkpoint_dir

    root = os.path.dirname(run_checkpoint_dir(args.out_dir, "x", "x", 0, "x"))
    empty = [os.path.basename(d) for d in sorted(glob.glob(os.path.join(root, "*"))) if not os.listdir(d)]
    lines += [f"- `{name}`: started, no epoch finished yet" for name in empty]
    if not rows and not empty:
        lines.append("None: every started run is finished (runs.jsonl).")
    for row in rows:
        valid = ", ".join(f"{k} {v:.4f}" for k, v in row["best_valid"].items() if k in ("ndcg@10", "recall@10"))
        lines += [f"- `{row['run']}` ({row['stage']}): {row['epochs']} epochs done (last saved {row['saved']}), "
                  f"{row['evaluations_without_gain']} evaluation(s) since the best; best valid so far: {valid or '–'}; "
                  f"training loss per epoch: {', '.join(f'{x:.1f}' for x in row['loss'])}"]
    path = os.path.join(args.out_dir, "progress.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(open(path).read())


if __name__ == "__main__":
    main()
