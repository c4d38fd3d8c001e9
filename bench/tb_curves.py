"""Per-epoch curves of finished runs from their TensorBoard logs (log_tensorboard/, git-ignored) as a Markdown table:
the validation score RecBole logs each epoch ('Vaild_score', RecBole's spelling), the seconds between evaluations,
and any other scalar asked for. For a results folder's README, where a run record keeps only the best epoch.

    python bench/tb_curves.py log_tensorboard/ReaRec-ml-100k-Dec-01-2026_12-25-45-02f3db --label "ReaRec 2020"
"""

import argparse
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curve(logdirs, tag):
    """[(epoch, value, wall time)] of `tag`, merged over the comma-separated folders of one resumed run (a later
    folder's epochs replace an earlier one's)."""
    points = {}
    for logdir in logdirs.split(","):
        events = EventAccumulator(logdir)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points.update({e.step: (e.step, e.value, e.wall_time) for e in events.Scalars(tag)})
    return [points[step] for step in sorted(points)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdirs", nargs="+", help="TensorBoard run folders, one argument per run (a resumed run: its folders joined by commas)")
    parser.add_argument("--label", action="append", default=[], help="a row label per logdir (default: its folder name)")
    parser.add_argument("--tag", default="Vaild_score", help="the scalar to tabulate (RecBole's valid score by default)")
    args = parser.parse_args()
    labels = args.label + [os.path.basename(d.split(",")[0].rstrip("/")) for d in args.logdirs[len(args.label):]]
    rows = [(label, curve(d, args.tag)) for label, d in zip(labels, args.logdirs)]
    width = max((max(step for step, _, _ in points) + 1 for _, points in rows if points), default=0)
    print(f"| run ({args.tag} per epoch) | " + " | ".join(str(e) for e in range(width)) + " | best epoch | s / epoch |")
    print("|---|" + "---:|" * (width + 2))
    for label, points in rows:
        by_step = {step: value for step, value, _ in points}
        best = max(points, key=lambda p: p[1])[0] if points else None
        gaps = [b[2] - a[2] for a, b in zip(points, points[1:]) if b[0] == a[0] + 1]  # not across a resume
        cells = [f"{by_step[e]:.4f}" if e in by_step else "" for e in range(width)]
        seconds = f"{sorted(gaps)[len(gaps) // 2]:.0f}" if gaps else ""
        print(f"| {label} | " + " | ".join(cells) + f" | {best} | {seconds} |")


if __name__ == "__main__":
    main()
