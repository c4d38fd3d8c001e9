"""Tune a model's hyperparameters, as RecBole's run_hyper.py does (hyperopt; no ray).

    python run_hyper.py --model=ReaRec --dataset=ml-100k --algo=random --max_evals=20
    python run_hyper.py -m SASRec -d ml-100k --params_file=my_space.hyper --algo=exhaustive
    python run_recbole_reason.py --hyper -m ReaRec -d ml-100k --algo=bayes --max_evals=30   # the same, from the run script

Writes RecBole's result file (--output_file) and the best configuration as YAML (--best_config_file), which
`run_recbole_reason.py --config_files=<it>` accepts. Further `--key=value` arguments fix config values.
"""

import argparse

from run_recbole_reason import keep_config_overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--config_files", default=None, help="space-separated fixed config files")
    parser.add_argument("--params_file", default=None, help="search space (default: properties/hyper/<Model>.hyper)")
    parser.add_argument("--algo", default="random", choices=["exhaustive", "random", "bayes"])
    parser.add_argument("--max_evals", type=int, default=20, help="trials for random and bayes (exhaustive: the grid)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without progress")
    parser.add_argument("--output_file", default=None)
    parser.add_argument("--best_config_file", default=None)
    args, _ = parser.parse_known_args(argv)
    keep_config_overrides(argv, args)
    from recbole_reason.hyper import tune

    stem = f"hyper_{args.model}_{args.dataset}"
    tuner = tune(args.model, args.dataset, params_file=args.params_file,
                 config_file_list=args.config_files.split() if args.config_files else None, algo=args.algo,
                 max_evals=args.max_evals, early_stop=args.early_stop,
                 output_file=args.output_file or f"{stem}.result", best_config_file=args.best_config_file or f"{stem}.best.yaml")
    print("best params:", tuner.best_params)
    print("best result:", tuner.params2result[tuner.params2str(tuner.best_params)])
    return tuner


def cli():
    """Console script: a bad option or search space ends with one clear line, not a traceback."""
    from recbole_reason.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
