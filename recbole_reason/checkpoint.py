"""Checkpoints: everything our trainers (RecBole's baselines included) read and write.

`CheckpointMixin` (`utils.get_trainer` puts it under every trainer):
- reads checkpoints through `compat.load_checkpoint` (torch >= 2.6 cannot read RecBole's pickled Config otherwise);
- refuses a checkpoint of another model, of other weight-shaping settings (`WEIGHT_SETTINGS`), of other item ids
  (`item_id_fingerprint`) or of other tensor shapes, with a message naming what differs and the fix;
- never writes a checkpoint holding NaN / inf weights, and writes through a rename (`save_atomically`);
- resume: after every epoch, `<checkpoint stem>-resume.pth` holds everything the next epoch depends on, and
  `resume(file)` continues from it to the numbers an uninterrupted run gives.
"""

import hashlib
import os
import random
import tempfile

import numpy as np
import torch

from recbole_reason.compat import load_checkpoint

RESUME_SUFFIX = "-resume.pth"
RESUME_FORMAT = 1

# Settings that decide what a checkpoint's weights mean: the item ids they index, the tokens or vocabulary they were
# trained on, their shapes, or how same-shaped tensors are wired (n_heads, hidden_act). A checkpoint trained with
# other values is refused with the values named, rather than failing on a shape inside load_state_dict or, worse,
# loading silently into a model that computes something else.
WEIGHT_SETTINGS = (
    # which items exist and which ids they get
    "dataset", "ITEM_ID_FIELD", "load_col", "unload_col", "unused_col", "rm_dup_inter", "val_interval",
    "filter_inter_by_user_or_item", "user_inter_num_interval", "item_inter_num_interval", "alias_of_item_id",
    "MAX_ITEM_LIST_LENGTH",
    # backbones: SASRec-style baselines, GRU4Rec, ReaRec, LARES, R2ec
    "embedding_size", "hidden_size", "inner_size", "n_layers", "num_layers", "n_heads", "hidden_act",
    # ReaRec's backbone; LARES's encoder
    "rearec_backbone", "lares_encoder", "k_interests",
    # LARES
    "n_pre_layers", "n_core_layers", "adapter_type",
    # REG4Rec's generator and item tokens (plus every mpq_* tokenizer setting, below)
    "d_model", "n_enc_layers", "n_dec_layers", "ffn_dim", "encoder_token_level", "logit_temperature",
    "item_feature_source", "n_pseudo_cat", "category_field",
    # R2ec's vocabulary, prompts and backbone
    "r2ec_backbone", "r2ec_hf_path", "r2ec_hf_gguf_file", "r2ec_text_fields", "r2ec_max_tokens_per_field", "r2ec_hist_tokens_per_item",
    "r2ec_item_id_token", "r2ec_vocab_min_freq", "r2ec_vocab_max", "r2ec_use_rating_token", "r2ec_time_gap_buckets",
    "r2ec_time_gap_to_target", "r2ec_max_reason_len",
)
# REG4Rec's MPQ tokenizer: every setting changes the item -> tokens table; R2ec's LoRA adapters: rank and target
# modules shape the adapter tensors, alpha scales what they add
WEIGHT_SETTING_PREFIXES = ("mpq_", "r2ec_lora_")
# Settings of where and how a run executes, not of what it computes: never reported as a difference.
RUNTIME_SETTINGS = {
    "device", "gpu_id", "use_gpu", "checkpoint_dir", "data_path", "show_progress", "state", "log_wandb",
    "wandb_project", "local_rank", "world_size", "nproc", "offset", "ip", "port", "single_spec", "backend",
    "save_resume_state", "resume", "worker", "config_files", "tokenizer_cache_dir", "verbose", "save_dataset",
    "save_dataloaders", "dataset_save_path", "dataloaders_save_path",
}


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this model, configuration or data; the message says what differs."""


def resume_state_file(checkpoint_file):
    """The resume state written next to a best-model checkpoint: <Model>-<time>.pth -> <Model>-<time>-resume.pth."""
    stem = checkpoint_file[:-4] if checkpoint_file.endswith(".pth") else checkpoint_file
    return stem + RESUME_SUFFIX


def item_id_fingerprint(dataset):
    """sha1 of a dataset's item id -> token table: equal iff every item id means the same item."""
    tokens = dataset.field2id_token[dataset.iid_field]
    return hashlib.sha1("\x1f".join(map(str, tokens)).encode("utf-8")).hexdigest()[:16]


def first_non_finite(state_dict):
    """Name of the first floating-point tensor holding NaN or inf, else None."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _settings(config):
    return config.final_config_dict if hasattr(config, "final_config_dict") else dict(config)


def differing_settings(saved_config, config, weight_only=True):
    """[(key, saved value, this run's value)] for keys that differ: the weight-shaping ones, or every key a run
    computes with (weight_only=False)."""
    saved, current = _settings(saved_config), _settings(config)
    if weight_only:
        keys = set(WEIGHT_SETTINGS) | {k for k in set(saved) | set(current) if k.startswith(WEIGHT_SETTING_PREFIXES)}
    else:
        keys = (set(saved) | set(current)) - RUNTIME_SETTINGS
    out = []
    for key in sorted(keys):
        old, new = saved.get(key), current.get(key)
        try:
            same = bool(old == new)
        except Exception:  # e.g. arrays: compare their text
            same = repr(old) == repr(new)
        if not same:
            out.append((key, old, new))
    return out


def _describe(differences, limit=6):
    shown = ", ".join(f"{key}={old!r} (this run: {new!r})" for key, old, new in differences[:limit])
    return shown + (f" and {len(differences) - limit} more" if len(differences) > limit else "")


def _flags(differences, limit=6):
    return " ".join(f"--{key}={old!r}" if isinstance(old, str) else f"--{key}={old}" for key, old, _ in differences[:limit])


def _shape_differences(saved_state, model_state, limit=4):
    problems = []
    for name in model_state:
        if name not in saved_state:
            problems.append(f"'{name}' missing from the checkpoint")
        elif tuple(saved_state[name].shape) != tuple(model_state[name].shape):
            problems.append(
                f"'{name}' is {list(saved_state[name].shape)} in the checkpoint, {list(model_state[name].shape)} here"
            )
    problems += [f"unexpected '{name}' in the checkpoint" for name in saved_state if name not in model_state]
    return "; ".join(problems[:limit]) + (f" and {len(problems) - limit} more" if len(problems) > limit else "")


def checkpoint_mismatch(checkpoint, source, config, model, item_fingerprint=None):
    """Why `checkpoint` (read from `source`) cannot be loaded into `model` under `config`, or None if it can.
    Checked in order: the model class, the weight-shaping settings, the item ids, the tensor names and shapes."""
    saved_config = checkpoint.get("config")
    saved_model = saved_config["model"] if saved_config is not None else None
    if saved_model and saved_model.lower() != config["model"].lower():
        return (
            f"Checkpoint {source} holds a {saved_model} model, not {config['model']}: "
            f"resume or evaluate it with --model={saved_model}, or pick a {config['model']} checkpoint."
        )
    differences = differing_settings(saved_config, config) if saved_config is not None else []
    if differences:
        return (
            f"Checkpoint {source} was trained with other settings that shape its weights or item ids: "
            f"{_describe(differences)}. Fix: run with the checkpoint's settings ({_flags(differences)}), "
            "or train a new model with these."
        )
    saved_fingerprint = checkpoint.get("item_fingerprint")
    if saved_fingerprint and item_fingerprint and saved_fingerprint != item_fingerprint:
        return (
            f"Checkpoint {source} was trained on other item ids than this run's '{config['dataset']}' data (its "
            "atomic files changed since, or were filtered differently): its item embeddings would score the wrong "
            "items. Fix: run on the data it was trained on, or train a new model on this data."
        )
    shapes = _shape_differences(checkpoint["state_dict"], model.state_dict())
    if shapes:
        others = differing_settings(saved_config, config, weight_only=False) if saved_config is not None else []
        hint = f" Settings that differ from the checkpoint's: {_describe(others)}." if others else ""
        return (
            f"Checkpoint {source} does not fit this {config['model']} model: {shapes}.{hint} Fix: run with the "
            "settings the checkpoint was trained with, or train a new model with these."
        )
    return None


def rng_states():
    """Every random number generator a training epoch draws from: torch (CPU and CUDA), numpy, python."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.cpu() for state in cuda])


def save_atomically(obj, path):
    """torch.save through a temporary file and a rename: a run killed while writing never leaves a truncated
    checkpoint in place of the last good one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    os.close(handle)
    try:
        torch.save(obj, temporary, pickle_protocol=4)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _distributed(config):
    return config["single_spec"] is False and torch.distributed.is_available() and torch.distributed.is_initialized()


class CheckpointMixin:
    """Every checkpoint a trainer reads or writes; `get_trainer` puts it under every trainer, baselines included.

    - loads with weights_only=False (torch >= 2.6 cannot read RecBole's pickled Config otherwise);
    - refuses a checkpoint of another model, of other weight-shaping settings (`WEIGHT_SETTINGS`), of other item
      ids (`item_id_fingerprint`) or of other tensor shapes, with a message naming what differs and the fix;
    - never writes a checkpoint holding NaN / inf weights, and writes through a rename (`save_atomically`);
    - resume: after every epoch, `<checkpoint stem>-resume.pth` holds everything the next epoch depends on (stage,
      weights, optimizer, early-stopping counters, best score and result, losses so far, non-persistent buffers,
      the torch / numpy / python RNG states and the train loader's shuffling generator, plus the trainer's own
      state from `_extra_resume_state`). `resume(file)` before `fit` continues from it, and the run ends with the
      same numbers as an uninterrupted one. `save_resume_state: False` switches the file off.
    The best-model checkpoint stays RecBole's file, written only on a valid-score improvement: `evaluate` and
    HyperTuning read it as before.
    """

    stage = "supervised"

    def __init__(self, config, model):
        super().__init__(config, model)
        save_state = config["save_resume_state"]
        if save_state is None:
            save_state = True
        if not isinstance(save_state, bool):
            raise ValueError(
                f"save_resume_state must be true or false (false: no per-epoch resume file), got {save_state!r}."
            )
        self.save_resume_state = save_state
        self.item_fingerprint = None
        self._resume_state = None
        self._resume_source = None
        self._epoch_context = None

    # -- loading ----------------------------------------------------------------------------------------------
    def load_model_weights(self, checkpoint_file):
        """Put a checkpoint file's weights (and other parameters) into `self.model`; returns the checkpoint."""
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        self._set_model_weights(checkpoint, checkpoint_file)
        return checkpoint

    def _set_model_weights(self, checkpoint, source="the checkpoint"):
        problem = checkpoint_mismatch(checkpoint, source, self.config, self.model, self.item_fingerprint)
        if problem:
            raise CheckpointMismatchError(problem)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))

    def _note_items(self, data):
        dataset = getattr(data, "_dataset", None)
        if self.item_fingerprint is None and dataset is not None and hasattr(dataset, "field2id_token"):
            self.item_fingerprint = item_id_fingerprint(dataset)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            self._note_items(eval_data)
            checkpoint_file = model_file or self.saved_model_file
            self.load_model_weights(checkpoint_file)
            self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        """RecBole's API: weights, optimizer and epoch of a best-model checkpoint (not the RNG or our stages; for an
        exact continuation use `resume`)."""
        resume_file = str(resume_file)
        checkpoint = load_checkpoint(resume_file, map_location=self.device)
        self._set_model_weights(checkpoint, resume_file)
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")
        return checkpoint

    # -- writing ----------------------------------------------------------------------------------------------
    def _refuse_non_finite(self, state_dict, epoch, target):
        bad = first_non_finite(state_dict)
        if bad is not None:
            raise FloatingPointError(
                f"{self.stage} stage: weight '{bad}' is NaN or inf after epoch {epoch}; training stopped and {target} "
                f"was not written. The last good model is in {self.saved_model_file}. Lower the learning rate or set "
                "gradient clipping (clip_grad_norm, or the RL stage's *_clip_grad_norm)."
            )

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's best-model checkpoint, plus the stage and the item-id fingerprint; never with NaN weights."""
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state_dict = self.model.state_dict()
        self._refuse_non_finite(state_dict, epoch, saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": state_dict,
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "stage": self.stage,
            "item_fingerprint": self.item_fingerprint,
        }
        save_atomically(state, saved_model_file)
        if verbose:
            from recbole.utils import set_color

            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    # -- resume -----------------------------------------------------------------------------------------------
    def resume_stages(self):
        """Stage names a resume state of this trainer may be in."""
        return (self.stage,)

    def _stage_train_loader(self, train_data):
        """The loader the current stage iterates (its shuffling generator is part of the resume state)."""
        return train_data

    def _extra_resume_state(self):
        """The trainer's own state beyond RecBole's (subclasses extend the dict)."""
        return {}

    def _load_extra_resume_state(self, extra, train_data):
        """Restore `_extra_resume_state`; runs after the weights, before the optimizer state is loaded."""

    def resume(self, checkpoint_file):
        """Continue an interrupted run: call before `fit`. `checkpoint_file`: the run's best-model checkpoint
        (<checkpoint_dir>/<Model>-<time>.pth) or the resume state next to it (<Model>-<time>-resume.pth). The run
        goes on writing the same two files."""
        checkpoint_file = str(checkpoint_file)
        path = checkpoint_file if checkpoint_file.endswith(RESUME_SUFFIX) else resume_state_file(checkpoint_file)
        if not os.path.isfile(path):
            if os.path.isfile(checkpoint_file):
                raise ValueError(
                    f"Cannot resume from {checkpoint_file}: there is no resume state {path} next to it (written after "
                    "every epoch unless save_resume_state is false). Fix: evaluate that checkpoint as it is, or "
                    "train again with save_resume_state: true."
                )
            raise FileNotFoundError(
                f"Cannot resume: {checkpoint_file} does not exist. Pass the interrupted run's checkpoint "
                "(<checkpoint_dir>/<Model>-<time>.pth, named in its log) or the -resume.pth file next to it."
            )
        state = load_checkpoint(path, map_location=self.device)
        if not isinstance(state, dict) or state.get("resume_format") != RESUME_FORMAT:
            raise ValueError(
                f"{path} is not a recbole-reason resume state (format {RESUME_FORMAT}): pass the checkpoint of a run "
                "trained with this version, or train again."
            )
        problem = checkpoint_mismatch(state, path, self.config, self.model)
        if problem:
            raise CheckpointMismatchError(problem)
        if state["stage"] not in self.resume_stages():
            raise ValueError(
                f"{path} stopped in the '{state['stage']}' stage, which this {self.config['model']} run does not "
                f"have (its stages: {', '.join(self.resume_stages())}). Fix: resume with the settings of the "
                "interrupted run (e.g. the same number of RL epochs)."
            )
        others = differing_settings(state["config"], self.config, weight_only=False)
        if others:
            self.logger.warning(
                f"Resuming {path} with settings that differ from the interrupted run's: {_describe(others, 8)}. "
                "The result will differ from what the interrupted run would have given."
            )
        self.saved_model_file = os.path.join(os.path.dirname(os.path.abspath(path)), state["best_model_file"])
        self._resume_state, self._resume_source = state, path
        done = " (finished)" if state["stage_done"] else ""
        self.logger.info(f"Resuming from {path}: {state['stage']} stage{done}, epoch {state['epoch']} done.")
        return state

    def _take_resume_state(self, stage):
        state = self._resume_state
        if state is None or state["stage"] != stage:
            return None
        self._resume_state = None
        return state

    def _restore_resume_state(self, state, train_data):
        self._set_model_weights(state, self._resume_source)
        buffers = dict(self.model.named_buffers())
        for name, value in state["buffers"].items():
            if name in buffers and buffers[name].shape == value.shape:
                buffers[name].copy_(value)
        self._load_extra_resume_state(state["trainer"], train_data)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state["best_valid_result"]
        self.train_loss_dict = dict(state["train_loss_dict"])
        self._stage_train_loader(train_data).generator.set_state(state["loader_generator"].cpu())
        rngs = state["rng"]
        rank = torch.distributed.get_rank() if _distributed(self.config) else 0
        set_rng_states(rngs[rank] if rank < len(rngs) else rngs[0])

    def _write_resume_state(self, epoch_idx, train_data, done, saved, epoch_loss=None):
        """Everything the epoch after `epoch_idx` depends on, into `<checkpoint stem>-resume.pth`."""
        if not (saved and self.save_resume_state):
            return
        rngs = [rng_states()]
        if _distributed(self.config):  # every rank draws its own numbers: keep each rank's states
            rngs = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(rngs, rng_states())
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = resume_state_file(self.saved_model_file)
        state_dict = self.model.state_dict()
        self._refuse_non_finite(state_dict, epoch_idx, path)
        losses = dict(self.train_loss_dict)
        if epoch_loss is not None:
            losses[epoch_idx] = epoch_loss
        state = {
            "resume_format": RESUME_FORMAT,
            "config": self.config,
            "stage": self.stage,
            "stage_done": bool(done),
            "epoch": epoch_idx,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "train_loss_dict": losses,
            "state_dict": state_dict,
            "other_parameter": self.model.other_parameter(),
            # e.g. R2ec's item table: not in the state_dict, yet the next epoch reads it
            "buffers": {name: b for name, b in self.model.named_buffers() if name not in state_dict},
            "optimizer": self.optimizer.state_dict(),
            "rng": rngs,
            "loader_generator": self._stage_train_loader(train_data).generator.get_state(),
            "item_fingerprint": self.item_fingerprint,
            "best_model_file": os.path.basename(self.saved_model_file),
            "trainer": self._extra_resume_state(),
        }
        save_atomically(state, path)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's fit for one stage, continued from a resume state of this stage if `resume` loaded one, and
        writing a resume state after every epoch."""
        self._note_items(train_data)
        state = self._take_resume_state(self.stage)
        evaluates = bool(valid_data) and self.eval_step > 0
        if state is not None:
            self._restore_resume_state(state, train_data)
            # finished under this run's settings: a resume with more epochs (or patience) trains on
            if self.cur_step > self.stopping_step or self.start_epoch >= self.epochs:
                if verbose:
                    self.logger.info(f"{self.stage} stage: finished in the resumed run, skipped.")
                if saved and not evaluates:  # without validation RecBole saves the last epoch's weights
                    self._save_checkpoint(state["epoch"], verbose=verbose)
                return self.best_valid_score, self.best_valid_result

        def after_validation(epoch_idx, valid_score):
            if callback_fn:
                callback_fn(epoch_idx, valid_score)
            stopping = self.cur_step > self.stopping_step  # RecBole's early_stopping stop flag
            self._write_resume_state(epoch_idx, train_data, stopping or epoch_idx + 1 >= self.epochs, saved)

        self._epoch_context = (train_data, evaluates, saved)
        try:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)
        finally:
            self._epoch_context = None

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        losses = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if self._epoch_context is not None:
            fit_data, evaluates, saved = self._epoch_context
            if not (evaluates and (epoch_idx + 1) % self.eval_step == 0):  # no validation follows: write now
                loss = sum(losses) if isinstance(losses, tuple) else losses
                self._write_resume_state(epoch_idx, fit_data, epoch_idx + 1 >= self.epochs, saved, epoch_loss=loss)
        return losses
