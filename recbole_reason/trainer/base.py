"""Trainers shared by the plugin's models.

`ReasonTrainer`: RecBole's `Trainer` that loads checkpoints under torch >= 2.6 and tells the model which epoch
it is in (`model.set_epoch(epoch)`, for warm-ups such as ReaRec's RCL).

`PostTrainingTrainer`: two named stages in one run, the shape of LARES (SPT -> RPT), R2ec (warm-up -> RecPO)
and REG4Rec (supervised -> PARS):
  1. the supervised stage: RecBole's own `fit` with the model's `calculate_loss`, early stopping, checkpoint;
  2. the post-training stage: the best supervised weights are reloaded, a frozen copy becomes
     `self.reference_model` (for KL terms), a fresh optimizer is built, and RecBole's same `fit` loop runs for
     `<post_epochs_key>` more epochs with `post_training_loss` as the loss. It early-stops on the same valid
     metric and saves into the **same** checkpoint file, only when the valid score beats the best so far
     (supervised stage included), so `evaluate(load_best_model=True)` and HyperTuning see the best model.
`<post_epochs_key>: 0` gives the supervised-only variant.
"""

import copy
import math
from collections import defaultdict

import torch

from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_reason.compat import TrustedCheckpointMixin


class ReasonTrainer(TrustedCheckpointMixin, Trainer):
    stage = "supervised"

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if hasattr(self.model, "set_epoch"):
            self.model.set_epoch(epoch_idx)
        loss_func = self._stop_on_non_finite(loss_func or self.model.calculate_loss, epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _stop_on_non_finite(self, loss_func, epoch_idx):
        """NaN or inf in any loss term stops training before the step, naming the term, stage, epoch and batch.
        Checkpoints are only written on a valid-score improvement, so the last good one stays on disk."""
        batch_index = 0

        def checked(interaction):
            nonlocal batch_index
            losses = loss_func(interaction)
            terms = losses if isinstance(losses, tuple) else (losses,)
            for name, value in zip(self._loss_names(losses), terms):
                if not torch.isfinite(value).all():
                    self._non_finite(f"loss term '{name}'", value.detach().float().sum().item(), epoch_idx, batch_index)
            batch_index += 1
            return losses

        return checked

    def _non_finite(self, what, value, epoch_idx, batch_index):
        raise FloatingPointError(
            f"{self.stage} stage: {what} is {value} at epoch {epoch_idx}, batch {batch_index}; training stopped. "
            f"The last good checkpoint is {self.saved_model_file} (written only on valid improvement). "
            "Lower the learning rate or set clip_grad_norm (e.g. --clip_grad_norm=\"{'max_norm': 1.0}\")."
        )

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


class PostTrainingTrainer(ReasonTrainer):
    post_stage = "post_training"  # name used in logs and TensorBoard tags, e.g. "rpt", "recpo", "pars"
    post_epochs_key = "rl_epochs"
    post_learning_rate_key = "rl_learning_rate"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.post_epochs = int(config[self.post_epochs_key] or 0)
        if self.post_epochs < 0:
            raise ValueError(f"{self.post_epochs_key} must be >= 0 (0 switches the {self.post_stage} stage off), got {self.post_epochs}.")
        self.post_learning_rate = config[self.post_learning_rate_key] or config["learning_rate"]
        self.reference_model = None
        self.stage_results = {}
        self._stats = defaultdict(list)

    # -- hooks for subclasses -------------------------------------------------------------------------------
    def start_post_training(self, train_data):
        """Called once between the stages, after the best supervised weights are loaded."""

    def post_training_loss(self, interaction):
        """The post-training loss of one batch (a tensor or a tuple of tensors, as `calculate_loss`)."""
        raise NotImplementedError

    def record(self, **stats):
        """Per-batch scalars (rewards, advantages, KL...) averaged per epoch into TensorBoard and the log."""
        for name, value in stats.items():
            value = float(value)
            if not math.isfinite(value):
                self._non_finite(f"'{name}'", value, len(self.train_loss_dict), len(self._stats[name]))
            self._stats[name].append(value)

    # -- the two stages -------------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._log_stage(verbose, 1, self.stage, f"epochs={self.epochs}")
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.stage_results[self.stage] = result
        if self.post_epochs == 0:
            return result

        if saved and valid_data:
            self.load_model_weights(self.saved_model_file)
        self.stage = self.post_stage
        self._log_stage(verbose, 2, self.post_stage, f"{self.post_epochs_key}={self.post_epochs}, lr={self.post_learning_rate}")
        self.reference_model = copy.deepcopy(self.model).eval()
        for parameter in self.reference_model.parameters():
            parameter.requires_grad_(False)
        self.start_post_training(train_data)
        self.optimizer = self._build_optimizer(learning_rate=self.post_learning_rate)
        self.cur_step = 0
        self.start_epoch = len(self.train_loss_dict)
        self.epochs = self.start_epoch + self.post_epochs
        self.eval_step = min(self.config["eval_step"], self.post_epochs)
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.stage_results[self.post_stage] = result
        return result

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

    def _log_stage(self, verbose, index, name, details):
        if verbose:
            self.logger.info(set_color(f"=== stage {index}/2: {name} ({details}) ===", "cyan"))
