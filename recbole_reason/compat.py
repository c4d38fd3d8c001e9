"""Every fix that RecBole 1.2.1 needs on today's torch / numpy / pandas / ray / hyperopt, in one place.

`apply()` runs once when `recbole_reason` is imported, before any RecBole object is built.
See ../shared/specs/recbole_plugin.md section 5 for the evidence behind each fix.

1. numpy >= 2 removed `np.float_`, `np.complex_` and `np.unicode_`, which `Config.compatibility_settings`
   reads: every `Config()` raised AttributeError. We define the three names, and the older aliases (`np.float`,
   `np.long`, ...) that RecBole's shim sets in `Config()` and the rest of RecBole (e.g. its metrics) reads, so that
   code evaluating without building a Config in the process works too.
2. torch >= 2.6 loads checkpoints with `weights_only=True`, which cannot read RecBole's pickled Config.
   `load_checkpoint` reads our own (local, trusted) checkpoints with `weights_only=False`; every checkpoint read
   of the plugin goes through it, and `get_trainer` puts `checkpoint.CheckpointMixin` (which uses it) under every
   trainer it returns, RecBole's baselines included. No process-wide environment flag.
3. pandas 3 breaks `token_seq` features (`Series.agg(len)`) and makes `fillna(inplace=True)` a silent no-op.
   We pin `pandas<3` in setup.py and refuse to run on pandas 3 with a message that says so.
4. `recbole.quick_start` imports ray at module level, which breaks on numpy 2 / setuptools >= 81. The plugin
   never imports it (it has its own quick_start); `tests/test_compat.py` proves it.
5. hyperopt >= 0.2.7 calls `rng.integers`, which RecBole's exhaustive (grid) search does not provide
   (it passes a `RandomState`). `exhaustive_search` below is the same grid search on a numpy Generator.
6. numpy 2 prints scalars as `np.float64(0.0689)`: RecBole's `Evaluator.evaluate` returns numpy scalars, so every
   logged or printed result dict read `{'recall@10': np.float64(0.0689), ...}`. `Evaluator.evaluate` now returns
   plain Python floats (the one place every trainer's metrics come from, RecBole's baselines included).

Besides the five: importing RecBole's sequential models runs `torch.autograd.set_detect_anomaly(True)` (in
`sine.py`), which roughly halves the training speed of every model in the process from the first RecBole model
lookup on, plugin models included. We import them once here and switch anomaly detection back off.
"""

import warnings

import numpy as np
import pandas as pd
import torch

_applied = False


def _patch_numpy_aliases():
    for old_name, new_value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old_name):
            setattr(np, old_name, new_value)
    # The aliases RecBole's `Config.compatibility_settings` sets, set here too: code that runs without building a
    # Config in the process (e.g. evaluating a checkpoint with its stored config) reads them as well.
    for old_name, new_value in (("bool", np.bool_), ("int", np.int_), ("float", np.float64), ("complex", np.complex128),
                                ("object", np.object_), ("str", np.str_), ("long", np.int_), ("unicode", np.str_)):
        if old_name not in np.__dict__:
            setattr(np, old_name, new_value)


def _check_pandas():
    if int(pd.__version__.split(".")[0]) >= 3:
        raise ImportError(
            f"recbole-reason needs pandas < 3 (found {pd.__version__}): RecBole 1.2.1 mis-loads token_seq item "
            "features and skips NaN filling on pandas 3. Fix: pip install 'pandas>=2.2,<3'"
        )


def load_checkpoint(path, map_location=None):
    """torch.load for RecBole checkpoints: they pickle the whole Config, so weights_only must be False.
    Only ever called on files this process (or the user) wrote."""
    return torch.load(path, map_location=map_location, weights_only=False)


def _trial_hash(vals):
    return hash(frozenset((key, value[0]) if len(value) > 0 else (key, None) for key, value in vals.items()))


def exhaustive_search(new_ids, domain, trials, seed, nbMaxSucessiveFailures=1000):
    """RecBole's grid search for hyperopt, drawing from a numpy Generator (hyperopt >= 0.2.7 calls
    `rng.integers`, which RecBole's `RandomState` lacks). Everything else is as in RecBole."""
    from hyperopt import pyll
    from hyperopt.base import miscs_update_idxs_vals

    seen = {_trial_hash(trial["misc"]["vals"]) for trial in trials.trials}
    rng = np.random.default_rng(seed)
    rval = []
    for new_id in new_ids:
        failures = 0
        while True:
            idxs, vals = pyll.rec_eval(domain.s_idxs_vals, memo={domain.s_new_ids: [new_id], domain.s_rng: rng})
            new_result = domain.new_result()
            new_misc = dict(tid=new_id, cmd=domain.cmd, workdir=domain.workdir)
            miscs_update_idxs_vals([new_misc], idxs, vals)
            if _trial_hash(vals) not in seen:
                break
            failures += 1
            if failures > nbMaxSucessiveFailures:
                return []  # the grid is exhausted
        rval.extend(trials.new_trial_docs([new_id], [None], [new_result], [new_misc]))
    return rval


def _patch_hyperopt_grid_search():
    import recbole.trainer.hyper_tuning as hyper_tuning

    hyper_tuning.exhaustive_search = exhaustive_search


def plain_numbers(result):
    """A metric dict with numpy scalars (numpy 2 reprs them as `np.float64(x)`) -> the same dict of Python numbers."""
    return type(result)((key, value.item() if isinstance(value, np.generic) else value) for key, value in result.items())


def _patch_evaluator_plain_numbers():
    from recbole.evaluator import Evaluator

    if getattr(Evaluator.evaluate, "_plain_numbers", False):
        return
    numpy_evaluate = Evaluator.evaluate

    def evaluate(self, dataobject):
        return plain_numbers(numpy_evaluate(self, dataobject))

    evaluate._plain_numbers = True
    Evaluator.evaluate = evaluate


def _undo_anomaly_detection():
    import recbole.model.sequential_recommender  # noqa: F401  (its sine.py switches anomaly detection on)

    torch.autograd.set_detect_anomaly(False)


def apply():
    global _applied
    if _applied:
        return
    _patch_numpy_aliases()
    _check_pandas()
    _patch_hyperopt_grid_search()
    _patch_evaluator_plain_numbers()
    _undo_anomaly_detection()
    # RecBole 1.2.1 calls APIs that pandas 2.x / torch deprecate (chained fillna, torch.cuda.amp.GradScaler).
    # They work on the pinned versions and the user cannot act on them: keep them out of every run's output.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
    _applied = True
