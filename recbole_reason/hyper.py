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


def default_params_file(model):
    path = os.path.join(properties_dir(), "hyper", f"{model}.hyper")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No search space ships for '{model}' ({path}): pass --params_file=<file>.")
    return path


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def tune(model, dataset, params_file=None, config_file_list=None, config_dict=None, algo="exhaustive",
         max_evals=20, early_stop=10, output_file=None, best_config_file=None):
    """Search the space of `params_file` for `model` on `dataset`; returns the HyperTuning object
    (`best_params`, `params2result`...). Every trial trains and tests one model with `objective_function`."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
    params_file = params_file or default_params_file(model)
    fixed = {"model": model, "dataset": dataset, **(config_dict or {})}

    def objective(params, files):
        return objective_function({**fixed, **params}, files)

    tuner = HyperTuning(objective, params_file=params_file, fixed_config_file_list=config_file_list,
                        algo=algo, max_evals=max_evals, early_stop=early_stop)
    tuner.run()
    if output_file:
        tuner.export_result(output_file=output_file)
    if best_config_file:
        best = {name: _plain(value) for name, value in tuner.best_params.items()}
        with open(best_config_file, "w") as f:
            f.write(f"# best of a {algo} search for {model} on {dataset} ({len(tuner.params2result)} trials, "
                    f"best valid score {float(tuner.best_score):.4f}); use with --config_files\n")
            yaml.safe_dump(best, f, sort_keys=True)
    return tuner
