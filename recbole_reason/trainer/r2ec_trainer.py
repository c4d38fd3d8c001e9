"""R2ecTrainer: supervised warm-up (`R2ec.calculate_loss`), then RecPO (`R2ec.recpo_loss`).

Stage 1 `warmup` (our addition, spec 6.3 stage A): RecBole's fit for `epochs` epochs, early stopping on valid NDCG@10.
Stage 2 `recpo` (the paper's RL, spec section 2): the best warm-up weights are reloaded, dropout is switched off
(the official code disables it so sampling and update see one policy), the item table is rebuilt, and every batch
is one fully on-policy RecPO step: K rollouts per user, fused reward, group advantages, token + item losses, one
optimizer step. The item table is fully re-encoded every `r2ec_item_refresh_steps` steps (its in-batch target rows
are overwritten at every step by the model). No KL and no reference model: `self.reference_model` is unused.
The best checkpoint of either stage is saved in the one RecBole checkpoint file (`evaluate` and tuning find it).
`recpo_epochs: 0` gives the warm-up-only variant.
"""

from recbole_reason.trainer.base import PostTrainingTrainer


class R2ecTrainer(PostTrainingTrainer):
    stage = "warmup"
    post_stage = "recpo"
    post_epochs_key = "recpo_epochs"
    post_learning_rate_key = "recpo_learning_rate"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.recpo_steps = 0

    def start_post_training(self, train_data):
        self.model.set_dropout(0.0)
        self.model.refresh_item_table()
        self.recpo_steps = 0

    def post_training_loss(self, interaction):
        if self.recpo_steps and self.recpo_steps % self.model.item_refresh_steps == 0:
            self.model.refresh_item_table()
        self.recpo_steps += 1
        losses, stats = self.model.recpo_loss(interaction)
        self.record(**stats, token_loss=losses[0].item(), item_loss=losses[1].item())
        return losses
