"""Hyperparameter tuning of any model (plugin or RecBole) with RecBole's `HyperTuning`.

The search space is RecBole's params-file format (`name type values`, one per line; types choice, uniform,
quniform, loguniform); `properties/hyper/<Model>.hyper` ships one per plugin model. The three algorithms,
`exhaustive` (grid over the choice parameters), `random` and `bayes` (TPE), work on today's hyperopt and numpy
(see compat.exhaustive_search). Results are exported in RecBole's format, and the best configuration as a YAML
file that `run_recbole_reason.py --config_files` accepts.
"""

import os

import numpy as np
import yaml
from recbole.trainer import HyperTuning

from recbole_reason.config import properties_dir
from recbole_reason.quick_start import objective_function

ALGORITHMS = ("exhaustive", "random", "bayes")
PARAM_TYPES = ("choice", "uniform", "quniform", "loguniform")


def default_params_file(model):
    path = os.path.join(properties_dir(), "hyper", f"{model}.hyper")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No search space ships for '{model}' ({path}): pass --params_file=<file>.")
    return path


def check_params_file(path):
    """A params file must exist and define at least one parameter in RecBole's format, `name type values`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"params_file {path} does not exist (format: one 'name type values' per line).")
    with open(path) as f:
        lines = [line.split() for line in f if len(line.split()) >= 3]  # RecBole skips shorter lines
    bad = [" ".join(parts) for parts in lines if parts[1] not in PARAM_TYPES]
    if not lines or bad:
        raise ValueError(
            f"params_file {path} must hold lines 'name type values' with type one of {PARAM_TYPES}, e.g. "
            f"'learning_rate choice [0.01,0.001]'; " + (f"bad lines: {bad}" if bad else "it defines no parameter")
        )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def best_trial(trials):
    """(params, score) of the best trial; the first of equals. RecBole's own bookkeeping replaces its best whenever
    the best score so far is 0 (`if not self.best_score`), which on small data or at a smaller-is-better metric's
    optimum exports the wrong configuration."""
    if not trials:
        raise ValueError("No trial ran: check the search space (params_file) and max_evals >= 1.")
    bigger = trials[0][1]["valid_score_bigger"]
    best_params, best = trials[0][0], trials[0][1]["best_valid_score"]
    for params, result in trials[1:]:
        score = result["best_valid_score"]
        if (score > best) if bigger else (score < best):
            best_params, best = params, score
    return best_params, best


def tune(model, dataset, params_file=None, config_file_list=None, config_dict=None, algo="exhaustive",
         max_evals=20, early_stop=10, output_file=None, best_config_file=None):
    """Search the space of `params_file` for `model` on `dataset`; returns the HyperTuning object
    (`best_params`, `params2result`...). Every trial trains and tests one model with `objective_function`."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
    for key, value in (("max_evals", max_evals), ("early_stop", early_stop)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    params_file = params_file or default_params_file(model)
    check_params_file(params_file)
    fixed = {"model": model, "dataset": dataset, **(config_dict or {})}

    trials = []

    def objective(params, files):
        result = objective_function({**fixed, **params}, files)
        trials.append((dict(params), result))
        return result

    tuner = HyperTuning(objective, params_file=params_file, fixed_config_file_list=config_file_list,
                        algo=algo, max_evals=max_evals, early_stop=early_stop)
    tuner.run()
    tuner.best_params, tuner.best_score = best_trial(trials)
    if output_file:
        tuner.export_result(output_file=output_file)
    if best_config_file:
        best = {name: _plain(value) for name, value in tuner.best_params.items()}
        with open(best_config_file, "w") as f:
            f.write(f"# best of a {algo} search for {model} on {dataset} ({len(tuner.params2result)} trials, "
                    f"best valid score {float(tuner.best_score):.4f}); use with --config_files\n")
            yaml.safe_dump(best, f, sort_keys=True)
    return tuner


CLI_USAGE = """Tune a model's hyperparameters, as RecBole's run_hyper.py does (hyperopt; no ray).

    python run_hyper.py --model=ReaRec --dataset=ml-100k --algo=random --max_evals=20
    python run_hyper.py -m SASRec -d ml-100k --params_file=my_space.hyper --algo=exhaustive
    python run_recbole_reason.py --hyper -m ReaRec -d ml-100k --algo=bayes --max_evals=30   # the same, from the run script

Writes RecBole's result file (--output_file) and the best configuration as YAML (--best_config_file), which
`run_recbole_reason.py --config_files=<it>` accepts. Further `--key=value` arguments fix config values.
"""


def main(argv=None):
    """The command line of run_hyper.py and of `run_recbole_reason.py --hyper` (both scripts call this one)."""
    import argparse

    from recbole_reason.cli import keep_config_overrides

    parser = argparse.ArgumentParser(description=CLI_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    stem = f"hyper_{args.model}_{args.dataset}"
    tuner = tune(args.model, args.dataset, params_file=args.params_file,
                 config_file_list=args.config_files.split() if args.config_files else None, algo=args.algo,
                 max_evals=args.max_evals, early_stop=args.early_stop,
                 output_file=args.output_file or f"{stem}.result", best_config_file=args.best_config_file or f"{stem}.best.yaml")
    print("best params:", tuner.best_params)
    print("best result:", tuner.params2result[tuner.params2str(tuner.best_params)])
    return tuner
