"""Tune a model's hyperparameters, as RecBole's run_hyper.py does (hyperopt; no ray).

    python run_hyper.py --model=ReaRec --dataset=ml-100k --algo=random --max_evals=20
    python run_hyper.py -m SASRec -d ml-100k --params_file=my_space.hyper --algo=exhaustive
    python run_recbole_reason.py --hyper -m ReaRec -d ml-100k --algo=bayes --max_evals=30   # the same, from the run script

Writes RecBole's result file (--output_file) and the best configuration as YAML (--best_config_file), which
`run_recbole_reason.py --config_files=<it>` accepts. Further `--key=value` arguments fix config values.
"""

from recbole_reason.hyper import main  # noqa: F401  (the command line lives beside tune)


def cli():
    """Console script: a bad option or search space ends with one clear line, not a traceback."""
    from recbole_reason.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
