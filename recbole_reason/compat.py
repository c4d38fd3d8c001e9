"""Every fix that RecBole 1.2.1 needs on today's torch / numpy / pandas / ray / hyperopt, in one place.

`apply()` runs once when `recbole_reason` is imported, before any RecBole object is built.
See ../shared/specs/recbole_plugin.md section 5 for the evidence behind each fix.

1. numpy >= 2 removed `np.float_`, `np.complex_` and `np.unicode_`, which `Config.compatibility_settings`
   reads: every `Config()` raised AttributeError. We define the three names; RecBole's own shim then sets
   the older aliases (`np.float`, `np.long`, ...) that the rest of RecBole uses.
2. torch >= 2.6 loads checkpoints with `weights_only=True`, which cannot read RecBole's pickled Config.
   `TrustedCheckpointMixin` loads our own (local, trusted) checkpoints with `weights_only=False`; `get_trainer`
   puts it under every trainer it returns, RecBole's baselines included. No process-wide environment flag.
3. pandas 3 breaks `token_seq` features (`Series.agg(len)`) and makes `fillna(inplace=True)` a silent no-op.
   We pin `pandas<3` in setup.py and refuse to run on pandas 3 with a message that says so.
4. `recbole.quick_start` imports ray at module level, which breaks on numpy 2 / setuptools >= 81. The plugin
   never imports it (it has its own quick_start); `tests/test_compat.py` proves it.
5. hyperopt >= 0.2.7 calls `rng.integers`, which RecBole's exhaustive (grid) search does not provide
   (it passes a `RandomState`). `exhaustive_search` below is the same grid search on a numpy Generator.
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


class TrustedCheckpointMixin:
    """Makes `Trainer.evaluate(load_best_model=True)` and `resume_checkpoint` work under torch >= 2.6."""

    def load_model_weights(self, checkpoint_file):
        """Put a checkpoint file's weights (and other parameters) into `self.model`; returns the checkpoint."""
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        self._set_model_weights(checkpoint)
        return checkpoint

    def _set_model_weights(self, checkpoint):
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            self.load_model_weights(checkpoint_file)
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = load_checkpoint(resume_file, map_location=self.device)
        saved_model = checkpoint["config"]["model"]
        if saved_model.lower() != self.config["model"].lower():
            raise ValueError(
                f"Checkpoint {resume_file} holds a {saved_model} model, not {self.config['model']}: "
                f"resume with --model={saved_model} or pick another checkpoint."
            )
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self._set_model_weights(checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")
        return checkpoint


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


def apply():
    global _applied
    if _applied:
        return
    _patch_numpy_aliases()
    _check_pandas()
    _patch_hyperopt_grid_search()
    # RecBole 1.2.1 calls APIs that pandas 2.x / torch deprecate (chained fillna, torch.cuda.amp.GradScaler).
    # They work on the pinned versions and the user cannot act on them: keep them out of every run's output.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
    _applied = True
