"""Evaluate trained models at several reasoning depths without retraining; table (Markdown, CSV) and figure.

    python run_depth_study.py --checkpoints saved/ReaRec-Nov-23-2026_10-00-00.pth --depths 0,1,2,3,4
    python run_depth_study.py --checkpoints "saved/LARES-a.pth saved/LARES-b.pth" --labels "SPT,SPT+RPT" --depths 1,2,4,8
    python run_depth_study.py --model ReaRec --dataset ml-100k --depths 0,1,2,3 --data_path=../shared/data  # trains first

Depth knobs: ReaRec reason_step, LARES test_recurrence, R2ec r2ec_max_reason_len, REG4Rec beam_size. Without
--depths each model gets depths below, at and beyond its trained one. Further `--key=value` arguments are config
settings: the training run's when it trains first, else applied to each checkpoint's stored config at evaluation
(e.g. --data_path=..., --eval_batch_size=...). Writes <out_dir>/depth_study.{md,csv,jsonl} and the figure depth_study.{png,pdf,svg}.
"""

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=None, help="space- or comma-separated trained checkpoints (.pth)")
    parser.add_argument("--model", "-m", default=None, help="with --dataset and no checkpoint: train this model first")
    parser.add_argument("--dataset", "-d", default=None)
    parser.add_argument("--config_files", default=None, help="space-separated config files (training first only)")
    parser.add_argument("--depths", default=None, help="comma-separated depths (default: around the trained one)")
    parser.add_argument("--labels", default=None, help="comma-separated line names, one per checkpoint")
    parser.add_argument("--metric", default=None, help="metric to plot, e.g. ndcg@10 (default: the valid_metric)")
    parser.add_argument("--split", default="test", choices=["test", "valid"])
    parser.add_argument("--out_dir", default="depth_study")
    return parser.parse_known_args(argv)


def main(argv=None):
    args, rest = parse_args(argv)
    sys.argv = sys.argv[:1]  # the settings reach Config through config_dict, not its command-line reader
    from recbole_reason.compare import cli_config_overrides
    from recbole_reason.depth_study import depth_study

    config_dict = cli_config_overrides(rest)

    split_list = lambda text: [part for part in text.replace(",", " ").split() if part] if text else None  # noqa: E731
    result = depth_study(
        checkpoints=split_list(args.checkpoints), model=args.model, dataset=args.dataset, depths=args.depths,
        config_file_list=args.config_files.split() if args.config_files else None, config_dict=config_dict,
        out_dir=args.out_dir, split=args.split, metric=args.metric,
        labels=[label.strip() for label in args.labels.split(",")] if args.labels else None,
    )
    print(open(result["files"]["md"], encoding="utf-8").read())
    print("written:", ", ".join(result["files"].values()))
    return result


def cli():
    """Bad input (a model without a depth, an invalid depth, a missing checkpoint) ends with one clear line."""
    from recbole_reason.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
