"""Trainers shared by the plugin's models.

`ReasonTrainer`: RecBole's `Trainer` that loads checkpoints under torch >= 2.6 and tells the model which epoch
it is in (`model.set_epoch(epoch)`, for warm-ups such as ReaRec's RCL). Numerical safety: a NaN or inf loss term,
RL statistic (`record`) or gradient stops training before the optimizer step, with a message naming the term, the
stage, the epoch and the step; checkpoints are never written with non-finite weights (`compat`).

`PostTrainingTrainer`: two named stages in one run, the shape of LARES (SPT -> RPT), R2ec (warm-up -> RecPO)
and REG4Rec (supervised -> PARS):
  1. the supervised stage: RecBole's own `fit` with the model's `calculate_loss`, early stopping, checkpoint;
  2. the post-training stage: the best supervised weights are reloaded, a frozen copy becomes
     `self.reference_model` (for KL terms), a fresh optimizer is built, and RecBole's same `fit` loop runs for
     `<post_epochs_key>` more epochs with `post_training_loss` as the loss and `<post_clip_grad_norm_key>` as
     its gradient clipping. It early-stops on the same valid metric and saves into the **same** checkpoint file,
     only when the valid score beats the best so far (supervised stage included), so
     `evaluate(load_best_model=True)` and HyperTuning see the best model.
`<post_epochs_key>: 0` gives the supervised-only variant.

Resume (`checkpoint.CheckpointMixin.resume`): a resume state is written after every epoch of either stage and
once when the post-training stage starts (it holds the frozen reference model and whatever `_extra_resume_state`
adds); a run resumed inside the post-training stage skips the supervised stage and calls `resume_post_training`
instead of `start_post_training`.
"""

import copy
import math
from collections import defaultdict

import torch

from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_reason.checkpoint import CheckpointMixin

CLIP_OPTIONS = ("max_norm", "norm_type", "error_if_nonfinite", "foreach")


def parse_clip_grad_norm(key, value):
    """A gradient-clipping setting as `torch.nn.utils.clip_grad_norm_` takes it: RecBole's dict form
    ({'max_norm': 1.0, 'norm_type': 2}) or a bare number (the max norm); None = no clipping."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"max_norm": value}
    if not isinstance(value, dict) or "max_norm" not in value:
        raise ValueError(
            f"{key} must be null (no clipping), a number > 0 (the max gradient norm) or a dict like "
            f"{{'max_norm': 1.0}}, got {value!r}."
        )
    max_norm = value["max_norm"]
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"{key}: max_norm must be a number > 0, got {max_norm!r}.")
    unknown = sorted(set(value) - set(CLIP_OPTIONS))
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {unknown}; clip_grad_norm_ takes {', '.join(CLIP_OPTIONS)}.")
    return dict(value)


class ReasonTrainer(CheckpointMixin, Trainer):
    stage = "supervised"
    clip_grad_norm_key = "clip_grad_norm"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.clip_grad_norm = parse_clip_grad_norm("clip_grad_norm", config["clip_grad_norm"])
        self.stage_steps = 0  # batches started in the current stage
        self.last_grad_norm = None  # total gradient norm at the last optimizer step, after clipping
        self._epoch_idx = self._batch_idx = self._step_idx = 0

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if hasattr(self.model, "set_epoch"):
            self.model.set_epoch(epoch_idx)
        self._epoch_idx = epoch_idx
        loss_func = self._stop_on_non_finite(loss_func or self.model.calculate_loss)
        # With AMP's GradScaler inf gradients are expected (the scaler skips those steps): no check there.
        hook = None if self.enable_scaler else self.optimizer.register_step_pre_hook(self._check_gradients)
        try:
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        finally:
            if hook is not None:
                hook.remove()

    def _stop_on_non_finite(self, loss_func):
        """NaN or inf in any loss term stops training before the step, naming the term, stage, epoch and batch.
        Checkpoints are only written on a valid-score improvement, so the last good one stays on disk."""
        batch_index = 0

        def checked(interaction):
            nonlocal batch_index
            self._batch_idx, self._step_idx = batch_index, self.stage_steps
            batch_index += 1
            self.stage_steps += 1
            losses = loss_func(interaction)
            terms = losses if isinstance(losses, tuple) else (losses,)
            for name, value in zip(self._loss_names(losses), terms):
                if not torch.isfinite(value).all():
                    self._non_finite(f"loss term '{name}'", value.detach().float().sum().item())
            return losses

        return checked

    def _check_gradients(self, optimizer, args, kwargs):
        """Optimizer step pre-hook (after RecBole's clipping): a non-finite gradient stops training before the
        weights change; the total norm is kept in `last_grad_norm`."""
        grads = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        if not grads:
            return
        norms = [torch.linalg.vector_norm((g.coalesce().values() if g.is_sparse else g).detach().float()) for _, g in grads]
        self.last_grad_norm = torch.linalg.vector_norm(torch.stack(norms)).item()
        if not math.isfinite(self.last_grad_norm):
            name = next(name for (name, _), norm in zip(grads, norms) if not torch.isfinite(norm))
            self._non_finite(f"the gradient of '{name}'", self.last_grad_norm)

    def _non_finite(self, what, value):
        raise FloatingPointError(
            f"{self.stage} stage: {what} is {value} at epoch {self._epoch_idx}, batch {self._batch_idx} "
            f"(step {self._step_idx} of the stage); training stopped before this step changed the weights. "
            f"The last good checkpoint is {self.saved_model_file} (written only on valid improvement), and its "
            "-resume.pth file holds the last finished epoch. Lower the learning rate or set gradient clipping "
            f"(--{self._clip_key()}=\"{{'max_norm': 1.0}}\"), then train again or resume with --resume=<checkpoint>."
        )

    def _clip_key(self):
        return "clip_grad_norm"

    def _loss_names(self, losses):
        """Names of the loss terms, from the model's optional `loss_names` (tuple, or callable returning one)."""
        names = getattr(self.model, "loss_names", None)
        names = names() if callable(names) else names
        if isinstance(losses, tuple) and names and len(names) == len(losses):
            return list(names)
        return [f"loss{index + 1}" for index in range(len(losses))] if isinstance(losses, tuple) else ["loss"]

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        places = self.config["loss_decimal_place"] or 4
        values = losses if isinstance(losses, tuple) else (losses,)
        terms = ", ".join(f"{name}: {value:.{places}f}" for name, value in zip(self._loss_names(losses), values))
        return set_color(f"epoch {epoch_idx} training ({self.stage})", "green") + f" [time: {e_time - s_time:.2f}s, {terms}]"

    def _add_train_loss_to_tensorboard(self, epoch_idx, losses, tag="Loss/Train"):
        values = losses if isinstance(losses, tuple) else (losses,)
        for name, value in zip(self._loss_names(losses), values):
            self.tensorboard.add_scalar(f"{self.stage}/{tag}/{name}", value, epoch_idx)
        self.tensorboard.flush()  # SummaryWriter flushes every 2 minutes: a short run would lose its last epochs

    def _valid_epoch(self, valid_data, show_progress=False):
        # RecBole logs only `Vaild_score`; every valid metric per stage makes stage-to-stage curves comparable.
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress=show_progress)
        for name, value in (valid_result or {}).items():
            self.tensorboard.add_scalar(f"{self.stage}/Valid/{name}", value, self._epoch_idx)
        self.tensorboard.flush()
        return valid_score, valid_result

    def _stage_to_tensorboard(self, index, name, details=""):
        """A stage transition in TensorBoard, at the stage's first epoch (the x axis of its loss curves): scalar
        `stage/<name>` = the stage's index, and the text `stage/transition`."""
        step = len(self.train_loss_dict)
        self.tensorboard.add_scalar(f"stage/{name}", index, step)
        self.tensorboard.add_text("stage/transition", f"stage {index}: {name}" + (f" ({details})" if details else ""), step)

    # -- resume ---------------------------------------------------------------------------------------------
    def _extra_resume_state(self):
        return {**super()._extra_resume_state(), "stage_steps": self.stage_steps}

    def _load_extra_resume_state(self, extra, train_data):
        super()._load_extra_resume_state(extra, train_data)
        self.stage_steps = extra["stage_steps"]


class PostTrainingTrainer(ReasonTrainer):
    post_stage = "post_training"  # name used in logs and TensorBoard tags, e.g. "rpt", "recpo", "pars"
    post_epochs_key = "rl_epochs"
    post_learning_rate_key = "rl_learning_rate"
    post_clip_grad_norm_key = None  # e.g. "rpt_clip_grad_norm"; None or a null value: RecBole's clip_grad_norm
    post_lr_warmup_steps_key = None  # e.g. "recpo_lr_warmup_steps": steps over which the stage's rate ramps up; None: no ramp
    uses_reference_model = True  # False: no frozen copy is made (a post-training stage without a KL term)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.post_epochs = int(config[self.post_epochs_key] or 0)
        if self.post_epochs < 0:
            raise ValueError(f"{self.post_epochs_key} must be >= 0 (0 switches the {self.post_stage} stage off), got {self.post_epochs}.")
        self.post_learning_rate = config[self.post_learning_rate_key] or config["learning_rate"]
        post_clip = config[self.post_clip_grad_norm_key] if self.post_clip_grad_norm_key else None
        self.post_clip_grad_norm = (
            self.clip_grad_norm if post_clip is None else parse_clip_grad_norm(self.post_clip_grad_norm_key, post_clip)
        )
        key = self.post_lr_warmup_steps_key
        self.post_lr_warmup_steps = int(config[key] or 0) if key else 0
        if self.post_lr_warmup_steps < 0:
            raise ValueError(f"{key} must be >= 0 (0 = the {self.post_stage} stage at {self.post_learning_rate_key} "
                             f"from its first step), got {self.post_lr_warmup_steps}.")
        self.reference_model = None
        self.stage_results = {}
        self._stats = defaultdict(list)

    # -- hooks for subclasses -------------------------------------------------------------------------------
    def start_post_training(self, train_data):
        """Called once between the stages, after the best supervised weights are loaded."""

    def resume_post_training(self, train_data, extra):
        """Called instead of `start_post_training` when a run resumes inside the post-training stage (after the
        weights are restored): rebuild what `start_post_training` set up, from `extra` (`_extra_resume_state`)."""

    def post_training_loss(self, interaction):
        """The post-training loss of one batch (a tensor or a tuple of tensors, as `calculate_loss`)."""
        raise NotImplementedError

    def record(self, **stats):
        """Per-batch scalars (rewards, advantages, KL...) averaged per epoch into TensorBoard and the log; a NaN or
        inf one stops training before the step, naming it."""
        for name, value in stats.items():
            value = float(value)
            if not math.isfinite(value):
                self._non_finite(f"'{name}'", value)
            self._stats[name].append(value)

    # -- the two stages -------------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self._resume_state is not None and self._resume_state["stage"] == self.post_stage:
            # stopped inside post-training: the supervised stage is finished and its result is in the resume state
            self.stage = self.post_stage
            self._log_stage(verbose, 2, self.post_stage, "resumed")
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
            self.stage_results[self.post_stage] = result
            return result

        self._log_stage(verbose, 1, self.stage, f"epochs={self.epochs}")
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.stage_results[self.stage] = result
        if self.post_epochs == 0:
            return result

        if saved and valid_data:
            self.load_model_weights(self.saved_model_file)
        return self._fit_post_stage(len(self.train_loss_dict), "", train_data, valid_data, verbose, saved,
                                    show_progress, callback_fn)

    def fit_post_training_from(self, checkpoint_file, train_data, valid_data, verbose=True, saved=True,
                               show_progress=False, callback_fn=None):
        """The post-training stage alone, entered from a first-stage checkpoint as `fit` enters it after stage 1:
        the checkpoint's weights, their valid score (measured again on `valid_data`) as the score to beat, and the
        first-stage model written to this run's own checkpoint file, so the run keeps it unless post-training raises
        valid. Several post-training settings can so start from one trained first stage."""
        if self.post_epochs == 0:
            raise ValueError(f"{self.post_epochs_key} is 0: there is no {self.post_stage} stage to fit. "
                             f"Set {self.post_epochs_key} >= 1.")
        if not valid_data:
            raise ValueError("fit_post_training_from needs valid_data: the first-stage model is kept unless "
                             f"{self.post_stage} raises valid.")
        first_stage = type(self).stage
        self._note_items(train_data)
        checkpoint = self.load_model_weights(checkpoint_file)
        if checkpoint.get("stage", first_stage) != first_stage:
            raise ValueError(f"{checkpoint_file} holds a model saved in the {checkpoint['stage']} stage, not the "
                             f"{first_stage} stage: pass a checkpoint of a run with {self.post_epochs_key}=0.")
        self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
        self.stage_results[first_stage] = (self.best_valid_score, self.best_valid_result)
        if saved:
            self._save_checkpoint(checkpoint["epoch"], verbose=verbose)
        return self._fit_post_stage(checkpoint["epoch"] + 1, f"from {checkpoint_file} (valid {self.best_valid_score:.4f}), ",
                                    train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _fit_post_stage(self, start_epoch, origin, train_data, valid_data, verbose, saved, show_progress, callback_fn):
        """Stage 2 from the first-stage weights now in the model (`fit`, `fit_post_training_from`)."""
        self._log_stage(verbose, 2, self.post_stage,
                        f"{origin}{self.post_epochs_key}={self.post_epochs}, lr={self.post_learning_rate}")
        self._enter_post_stage(train_data, start_epoch=start_epoch)
        # Resuming from here on skips stage 1 and keeps this reference model, whatever the checkpoint holds later.
        self._write_resume_state(self.start_epoch - 1, train_data, done=False, saved=saved)
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.stage_results[self.post_stage] = result
        return result

    def _enter_post_stage(self, train_data, start_epoch, extra=None):
        """Frozen reference copy, the subclass's set-up (or its restore from a resume state), a fresh optimizer at
        the post-training learning rate and clipping, and the stage's epoch range."""
        self.stage = self.post_stage
        if self.uses_reference_model:
            self.reference_model = copy.deepcopy(self.model).eval()
            for parameter in self.reference_model.parameters():
                parameter.requires_grad_(False)
        if extra is None:
            self.start_post_training(train_data)
        else:
            if self.uses_reference_model:
                self.reference_model.load_state_dict(extra["reference_state_dict"])
            self.resume_post_training(train_data, extra)
        self.optimizer = self._build_optimizer(learning_rate=self.post_learning_rate)
        if self.post_lr_warmup_steps:
            self.optimizer.register_step_pre_hook(self._ramp_learning_rate)
        self.clip_grad_norm = self.post_clip_grad_norm
        self.cur_step = 0
        self.stage_steps = 0
        self.start_epoch = start_epoch
        self.epochs = start_epoch + self.post_epochs
        self.eval_step = min(self.config["eval_step"], self.post_epochs)

    def _ramp_learning_rate(self, optimizer, args, kwargs):
        """Before each step of the stage's fresh optimizer: lr = post_lr * min(1, step / warmup_steps), step counted
        from 1 (`stage_steps`, kept by the resume state). A fresh Adam's first updates are ~lr in every weight
        whatever the gradient's size; on a converged first-stage model they are a jolt."""
        for group in optimizer.param_groups:
            group["lr"] = self.post_learning_rate * min(1.0, self.stage_steps / self.post_lr_warmup_steps)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.stage == self.post_stage:
            loss_func = loss_func or self.post_training_loss
        self._stats.clear()
        losses = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        for name, values in self._stats.items():
            mean = sum(values) / len(values)
            self.tensorboard.add_scalar(f"{self.stage}/{name}", mean, epoch_idx)
            self.logger.info(set_color(f"epoch {epoch_idx} {self.stage}", "green") + f" {name}: {mean:.4f}")
        return losses

    def _clip_key(self):
        if self.stage == self.post_stage and self.post_clip_grad_norm_key:
            return self.post_clip_grad_norm_key
        return super()._clip_key()

    def _log_stage(self, verbose, index, name, details):
        self._stage_to_tensorboard(index, name, details)
        if verbose:
            self.logger.info(set_color(f"=== stage {index}/2: {name} ({details}) ===", "cyan"))

    # -- resume ---------------------------------------------------------------------------------------------
    def resume_stages(self):
        first = type(self).stage
        return (first, self.post_stage) if self.post_epochs > 0 else (first,)

    def _extra_resume_state(self):
        extra = {**super()._extra_resume_state(), "stage_results": dict(self.stage_results)}
        if self.stage == self.post_stage:
            if self.uses_reference_model:
                extra["reference_state_dict"] = self.reference_model.state_dict()
            extra["post_start_epoch"] = self.epochs - self.post_epochs
        return extra

    def _load_extra_resume_state(self, extra, train_data):
        if self.stage == self.post_stage:
            self._enter_post_stage(train_data, extra["post_start_epoch"], extra)
        super()._load_extra_resume_state(extra, train_data)
        self.stage_results = dict(extra["stage_results"])
