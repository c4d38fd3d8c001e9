"""`LARESTrainer`: LARES's self-supervised pre-training (SPT), then its reinforcement post-training (RPT), then the
depth-scaling evaluation.

- SPT is RecBole's `fit` on `LARES.calculate_loss` (CE + alpha * TLA + gamma * SLA), early-stopped, checkpointed.
- RPT (`PostTrainingTrainer`'s second stage): the best SPT weights are reloaded and frozen as the reference; the
  policy's dropout is set to `rl_dropout_prob`; the training rows are filtered to those whose target the SPT model
  ranks in its top `filter_topk` in any of `filter_iters` eval passes; each batch runs the GRPO-style
  `LARES.reinforcement_post_training_loss`. The better model of the two stages is in the one checkpoint file.
- `post_evaluate` re-evaluates the best model at every depth of `depth_scaling_recurrences`.
`rl_epochs: 0` gives the SPT-only variant. `rpt_clip_grad_norm` clips RPT's gradients (null: clip_grad_norm).
Resume: RPT's resume state also holds the kept row indices and the frozen reference's eval-noise generator.
"""

import os

import torch
from recbole.utils import dict2str, set_color
from torch import nn
from tqdm import tqdm

from recbole_reason.distributed import broadcast_from_rank0
from recbole_reason.utils import metrics_table
from recbole_reason.trainer.base import PostTrainingTrainer


class LARESTrainer(PostTrainingTrainer):
    stage = "spt"
    post_stage = "rpt"
    post_epochs_key = "rl_epochs"
    post_learning_rate_key = "rl_learning_rate"
    post_clip_grad_norm_key = "rpt_clip_grad_norm"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.data_filter = config["data_filter"]
        self.filter_topk = config["filter_topk"]
        self.filter_iters = config["filter_iters"]
        self.rl_dropout_prob = config["rl_dropout_prob"]
        self.rl_train_batch_size = config["rl_train_batch_size"]
        depths = config["depth_scaling_recurrences"]
        self.depth_scaling_recurrences = [] if depths is None else list(depths)
        self._validate()
        self.rpt_train_data = None
        self.rpt_rows = None  # indices of the training rows RPT trains on (kept in the resume state)
        self.rpt_rows_kept = None

    def _validate(self):
        def positive_int(key, value):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}.")

        if not isinstance(self.data_filter, bool):
            raise ValueError(f"data_filter must be true or false, got {self.data_filter!r}.")
        positive_int("filter_topk", self.filter_topk)
        positive_int("filter_iters", self.filter_iters)
        if self.rl_dropout_prob is not None and not (
            isinstance(self.rl_dropout_prob, (int, float)) and 0 <= self.rl_dropout_prob < 1
        ):
            raise ValueError(f"rl_dropout_prob must be in [0, 1) or null (keep hidden_dropout_prob), got {self.rl_dropout_prob!r}.")
        if self.rl_train_batch_size is not None:
            positive_int("rl_train_batch_size", self.rl_train_batch_size)
        for depth in self.depth_scaling_recurrences:
            positive_int("every depth in depth_scaling_recurrences", depth)

    # -- RPT ------------------------------------------------------------------------------------------------
    def start_post_training(self, train_data):
        self._set_rl_dropout()
        dataset = train_data._dataset
        keep = self.top_k_filter(dataset) if self.data_filter else torch.ones(len(dataset), dtype=torch.bool)
        # DDP: every rank must train on the same rows (equal batch counts), even if GPU float noise flips a rank
        keep = broadcast_from_rank0(keep, self.config)
        kept = int(keep.sum())
        if kept == 0:
            raise ValueError(
                f"The RPT data filter kept no training row (no target in the SPT model's top {self.filter_topk}): "
                "raise filter_topk, set data_filter: False, or train SPT longer."
            )
        self.rpt_rows_kept = kept
        rule = f"target in the top {self.filter_topk} of any of {self.filter_iters} passes" if self.data_filter else "filter off"
        self.logger.info(set_color("rpt data filter", "green") + f": {kept}/{len(dataset)} training rows kept ({rule})")
        self.tensorboard.add_scalar("rpt/rows_kept", kept, 0)
        self._train_on_rows(train_data, torch.nonzero(keep).squeeze(1))

    def resume_post_training(self, train_data, extra):
        # The kept rows come from the resume state: re-filtering would need the SPT weights, which an RPT epoch
        # may have replaced in the checkpoint file since.
        self._set_rl_dropout()
        self._train_on_rows(train_data, extra["rpt_rows"].cpu())
        self.rpt_rows_kept = len(self.rpt_rows)
        # The frozen reference draws its S_0 from its own eval-noise generator, never reset during RPT: a fresh
        # one would give it other noise than the uninterrupted run.
        noise = self.reference_model._eval_noise
        noise.reset()
        for device, state in extra["reference_eval_noise"].items():
            noise.get(torch.device(device)).set_state(state.cpu())

    def _set_rl_dropout(self):
        if self.rl_dropout_prob is not None:
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(self.rl_dropout_prob)

    def _train_on_rows(self, train_data, rows):
        dataset = train_data._dataset
        self.rpt_rows = rows
        self.rpt_train_data = self._loader_like(train_data, dataset.copy(dataset.inter_feat[rows]))

    def _stage_train_loader(self, train_data):
        if self.stage == self.post_stage and self.rpt_train_data is not None:
            return self.rpt_train_data
        return train_data

    def _extra_resume_state(self):
        extra = super()._extra_resume_state()
        if self.stage == self.post_stage:
            extra["rpt_rows"] = self.rpt_rows
            generators = self.reference_model._eval_noise.generators
            extra["reference_eval_noise"] = {device: g.get_state() for device, g in generators.items()}
        return extra

    @torch.no_grad()
    def top_k_filter(self, dataset):
        """Rows whose target the SPT model (eval mode, T = test_recurrence, its eval noise) ranks in the top
        `filter_topk` in any of `filter_iters` passes over the training split."""
        self.model.eval()
        inter_feat = dataset.inter_feat
        keep = torch.zeros(len(inter_feat), dtype=torch.bool)
        batch_size = self.config["eval_batch_size"]
        starts = [start for _ in range(self.filter_iters) for start in range(0, len(inter_feat), batch_size)]
        for start in tqdm(starts, desc="rpt data filter", unit="batch", disable=not self.config["show_progress"]):
            batch = inter_feat[start : start + batch_size].to(self.device)
            keep[start : start + batch_size] |= (self.model.target_rank(batch) < self.filter_topk).cpu()
        return keep

    def _loader_like(self, train_data, dataset):
        """A loader of the same class over the filtered rows, at the RPT batch size."""
        batch_size = self.rl_train_batch_size or self.config["train_batch_size"]
        previous = self.config["train_batch_size"]
        self.config["train_batch_size"] = batch_size
        try:
            return type(train_data)(self.config, dataset, train_data._sampler, shuffle=train_data.shuffle)
        finally:
            self.config["train_batch_size"] = previous

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.stage == self.post_stage and self.rpt_train_data is not None:
            train_data = self.rpt_train_data
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _loss_names(self, losses):
        # SPT's terms by their paper names: TensorBoard tags spt/Loss/Train/ce|tla|sla rather than loss1..3.
        if self.stage == type(self).stage and isinstance(losses, tuple) and len(losses) == 3:
            return ["ce", "tla", "sla"]
        return super()._loss_names(losses)

    def post_training_loss(self, interaction):
        loss, stats = self.model.reinforcement_post_training_loss(interaction, self.reference_model)
        self.record(**stats)
        return loss

    # -- depth scaling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def post_evaluate(self, test_data):
        """The best model evaluated at every test depth of `depth_scaling_recurrences` (the paper's step-scaling
        study). Returns {"depth_results": {depth: test_result}}; each depth is logged and written to TensorBoard
        as `depth/<metric>` with the depth as the step."""
        if not self.depth_scaling_recurrences or not test_data:
            return {}
        if self.saved_model_file and os.path.isfile(self.saved_model_file):
            self.load_model_weights(self.saved_model_file)
        trained_depth = self.model.test_recurrence
        results = {}
        self.tensorboard.add_scalar("stage/depth_scaling", 3, len(self.train_loss_dict))
        try:
            depths = tqdm(self.depth_scaling_recurrences, desc="depth scaling", disable=not self.config["show_progress"])
            for depth in depths:
                self.model.test_recurrence = depth
                result = self.evaluate(test_data, load_best_model=False)
                results[depth] = result
                self.logger.info(set_color(f"test at depth {depth}", "yellow") + f": {dict2str(result)}")
                for metric, value in result.items():
                    self.tensorboard.add_scalar(f"depth/{metric}", value, depth)
        finally:
            self.model.test_recurrence = trained_depth
        self.logger.info(
            set_color("LARES depth scaling (test)", "yellow")
            + "\n"
            + metrics_table({f"T = {depth}": result for depth, result in results.items()})
        )
        return {"depth_results": results}
