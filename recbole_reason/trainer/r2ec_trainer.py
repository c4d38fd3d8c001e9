"""R2ecTrainer: supervised warm-up (`R2ec.calculate_loss`), then RecPO (`R2ec.recpo_loss`).

Stage 1 `warmup` (our addition, spec 6.3 stage A): RecBole's fit for `epochs` epochs, early stopping on valid NDCG@10.
Stage 2 `recpo` (the paper's RL, spec section 2): the best warm-up weights are reloaded, dropout is set to
`recpo_dropout_prob` (0, the official code's choice so that sampling and update see one policy; ours keeps it to
regularise, harmless to the ratio, which is 1 in a fully on-policy step), the item table is rebuilt, and every batch
is one fully on-policy RecPO step: K rollouts per user, fused reward, group advantages, token + item losses, one
optimizer step. The item table is fully re-encoded every `r2ec_item_refresh_steps` steps (its in-batch target rows
are overwritten at every step by the model). No KL and so no reference model: none is copied (`uses_reference_model`; a copy of a
Hugging Face backbone would double its memory).
The best checkpoint of either stage is saved in the one RecBole checkpoint file (`evaluate` and tuning find it).
`recpo_epochs: 0` gives the warm-up-only variant. `recpo_clip_grad_norm` (official 1.0) clips RecPO's gradients
(null: clip_grad_norm); with `recpo_balance_losses` the token and the item loss's gradients are first clipped each on
its own (`rl.balanced_gradients`: their raw norms differ by ~3000x, and one clip of the sum kept the item loss's
direction only), then their sum is clipped again. Under DDP the losses are summed unbalanced (DDP reduces
gradients in backward hooks that `torch.autograd.grad` does not fire). Resume: the item table (a non-persistent
buffer) and the RecPO step counter are in the resume state.
"""

import torch

from recbole_reason.model.rl import balanced_gradients
from recbole_reason.trainer.base import PostTrainingTrainer


class R2ecTrainer(PostTrainingTrainer):
    stage = "warmup"
    post_stage = "recpo"
    post_epochs_key = "recpo_epochs"
    post_learning_rate_key = "recpo_learning_rate"
    post_clip_grad_norm_key = "recpo_clip_grad_norm"
    post_lr_warmup_steps_key = "recpo_lr_warmup_steps"
    uses_reference_model = False
    # DDP: each rank overwrites its own batch's rows of the item table; every rank keeps the rows of all ranks
    ddp_row_synced_buffers = ("item_table",)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.recpo_steps = 0
        # Balancing clips each loss to the stage's max norm: without one (both clip settings null) there is none.
        self.balance_losses = bool(config["recpo_balance_losses"]) and bool(self.post_clip_grad_norm)
        dropout = config["recpo_dropout_prob"]
        self.recpo_dropout = 0.0 if dropout is None else dropout
        if not (isinstance(self.recpo_dropout, (int, float)) and 0 <= self.recpo_dropout < 1):
            raise ValueError(f"recpo_dropout_prob must be a number in [0, 1) (0 = the official RecPO without dropout), "
                             f"got {dropout!r}.")

    def start_post_training(self, train_data):
        self.model.set_dropout(self.recpo_dropout)
        self.model.refresh_item_table()
        self.recpo_steps = 0

    def resume_post_training(self, train_data, extra):
        self.model.set_dropout(self.recpo_dropout)  # the item table itself comes back with the model's buffers

    # Resume: besides the item table (a non-persistent buffer, kept by the resume state), the next step reads the
    # RecPO step counter (it decides when the table is re-encoded) and whether the table is stale.
    MODEL_COUNTERS = ("_table_dirty",)

    def _extra_resume_state(self):
        extra = super()._extra_resume_state()
        extra["recpo_steps"] = self.recpo_steps
        extra["model_counters"] = {name: getattr(self.model, name) for name in self.MODEL_COUNTERS if hasattr(self.model, name)}
        return extra

    def _load_extra_resume_state(self, extra, train_data):
        super()._load_extra_resume_state(extra, train_data)
        self.recpo_steps = extra["recpo_steps"]
        for name, value in extra["model_counters"].items():
            setattr(self.model, name, value)

    def _loss_names(self, losses):
        # TensorBoard tags warmup/Loss/Train/rec|lm and recpo/Loss/Train/token|item rather than loss1|loss2.
        if isinstance(losses, tuple) and len(losses) == 2:
            return ["token", "item"] if self.stage == self.post_stage else ["rec", "lm"]
        return super()._loss_names(losses)

    def post_training_loss(self, interaction):
        if self.recpo_steps and self.recpo_steps % self.model.item_refresh_steps == 0:
            self.model.refresh_item_table()
        self.recpo_steps += 1
        losses, stats = self.model.recpo_loss(interaction)
        if self.balance_losses and not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            norms = balanced_gradients(losses, self.model.parameters(), self.post_clip_grad_norm["max_norm"])
            stats.update(token_grad_norm=norms[0], item_grad_norm=norms[1])
            # The gradients are in .grad now; RecBole's backward of the returned values must add nothing to them.
            losses = tuple(loss.detach().requires_grad_() for loss in losses)
        self.record(**stats, token_loss=losses[0].item(), item_loss=losses[1].item())
        return losses
