"""`REG4RecTrainer`: tokenizer -> supervised generator (CRSS) -> PARS (GRPO) with MSRA rewards.

Stage 0, tokenizer: `build_item_tokens` (MPQ, collision resolution, categories; cached on disk) fills the model's
         token buffers and the dataset's token table. Logged: collision rate before/after, code usage per codebook.
Stage 1, supervised: RecBole's `fit` with `REG4Rec.calculate_loss` (CRSS teacher forcing), early stopping.
Stage 2, PARS (`pars_epochs` > 0): per batch, G CRSS paths per context are sampled from pi_old under the validity
         constraint; rewards = the four PARS rewards, scored by MSRA against the target and the next
         `msra_window - 1` *training* items with decay `msra_gamma`; group-normalised advantages, clipped ratio,
         k3-KL to the frozen supervised model (`reference_model`), plus an SFT anchor. pi_old is the current policy
         (`pars_old_policy_refresh: batch`, on-policy: one gradient step per rollout batch), a frozen snapshot
         refreshed every k batches (an integer k) or every epoch (`epoch`). Every log-prob of the ratio and the KL
         is computed by the same function (`path_log_probs`, at `pars_temperature`) with dropout off
         (`pars_policy_dropout: False`), so the ratio is exactly 1 at identical weights: only a real update moves
         it (with dropout in the policy pass, dropout noise alone gave the ratio a std of ~0.13). The best model (valid NDCG@10, both stages) is saved in the one checkpoint RecBole's
         `evaluate` and HyperTuning load. `pars_clip_grad_norm` clips PARS's gradients (null: clip_grad_norm).
Resume: stage 0 reads its on-disk cache; pi_old is re-snapshotted at every PARS epoch start, so the resume state
needs nothing beyond `PostTrainingTrainer`'s (reference model included).
"""

import copy

import torch
from recbole.utils import set_color

from recbole_reason.data.mpq_tokenizer import TokenizerMonitor, build_item_tokens
from recbole_reason.data.reg4rec_dataset import TARGET_POS_FIELD
from recbole_reason.distributed import rank_zero_first
from recbole_reason.model.rl import clipped_policy_loss, group_normalized_advantages, kl_to_reference
from recbole_reason.model.sequential_recommender.reg4rec import msra_rewards
from recbole_reason.trainer.base import PostTrainingTrainer


class REG4RecTrainer(PostTrainingTrainer):
    stage = "supervised"
    post_stage = "pars"
    post_epochs_key = "pars_epochs"
    post_learning_rate_key = "pars_learning_rate"
    post_clip_grad_norm_key = "pars_clip_grad_norm"

    def __init__(self, config, model):
        super().__init__(config, model)

        def non_negative(key, default):
            value = float(config[key] if config[key] is not None else default)
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}.")
            return value

        self.clip_eps = non_negative("pars_clip", 0.2)
        if self.clip_eps == 0:
            raise ValueError("pars_clip must be > 0 (0 would freeze the policy ratio), got 0.")
        self.kl_beta = non_negative("pars_kl_beta", 0.02)
        self.sft_weight = non_negative("pars_sft_weight", 0.1)
        refresh = config["pars_old_policy_refresh"] if config["pars_old_policy_refresh"] is not None else "batch"
        if isinstance(refresh, bool) or not (refresh in ("epoch", "batch") or (isinstance(refresh, int) and refresh >= 1)):
            raise ValueError(
                f"pars_old_policy_refresh must be 'batch', 'epoch' or a number of batches >= 1, got {refresh!r}."
            )
        self.refresh = refresh
        self.policy_dropout = bool(config["pars_policy_dropout"]) if config["pars_policy_dropout"] is not None else False
        self._pars_steps = 0
        self.context_ratio = float(config["pars_context_ratio"] if config["pars_context_ratio"] is not None else 1.0)
        if not 0.0 < self.context_ratio <= 1.0:
            raise ValueError(f"pars_context_ratio must be in (0, 1], got {self.context_ratio}.")
        self.old_model = None
        self.item_tokens = None
        self.train_dataset = None

    # -- stage 0 ------------------------------------------------------------------------------------------
    def tokenize(self, train_data):
        dataset = train_data._dataset
        with rank_zero_first(self.config):  # DDP: rank 0 builds and caches the tokens, the other ranks read the cache
            monitor = TokenizerMonitor(self.tensorboard, self.config["show_progress"])
            tokens = build_item_tokens(self.config, dataset, self.logger, monitor=monitor)
        dataset.attach_item_tokens(tokens)
        self.model.set_item_tokens(tokens)
        stats = tokens.stats
        self.logger.info(
            set_color("tokenizer", "green")
            + f" collision rate before {stats['collision_rate_before']:.4f} -> after {stats['collision_rate_after']:.4f}; "
            + f"code usage per codebook {[round(u, 3) for u in stats['code_usage']]}; "
            + f"categories from {stats['category_source']}; {'cached' if tokens.from_cache else 'built'}: {tokens.cache_file}"
        )
        self.tensorboard.add_scalar("tokenizer/collision_rate_before", stats["collision_rate_before"], 0)
        self.tensorboard.add_scalar("tokenizer/collision_rate_after", stats["collision_rate_after"], 0)
        for r, usage in enumerate(stats["code_usage"]):
            self.tensorboard.add_scalar(f"tokenizer/code_usage_{r}", usage, 0)
        return tokens

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if verbose:
            self.logger.info(set_color("=== stage 0: tokenizer (MPQ) ===", "cyan"))
        self._stage_to_tensorboard(0, "tokenizer", "MPQ")
        self.item_tokens = self.tokenize(train_data)
        self.train_dataset = train_data._dataset
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    # -- stage 2 ------------------------------------------------------------------------------------------
    def start_post_training(self, train_data):
        self.train_dataset = train_data._dataset
        if self.model.msra_window > 1 and not hasattr(self.train_dataset, "future_items"):
            raise ValueError("msra_window > 1 needs REG4RecDataset (future training items); build the data via recbole_reason.")

    def resume_post_training(self, train_data, extra):
        # pi_old needs nothing from the resume state: it is snapshotted from the policy at every epoch start.
        self.start_post_training(train_data)

    def snapshot_old_policy(self):
        self.old_model = copy.deepcopy(self.model).eval()
        for parameter in self.old_model.parameters():
            parameter.requires_grad_(False)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.stage == self.post_stage and self.refresh != "batch":
            self.snapshot_old_policy()
            self._pars_steps = 0
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def msra_targets(self, interaction):
        """[B, K] the target (k = 1) and the next K-1 *training* items (0 = missing); K = msra_window."""
        model = self.model
        target = interaction[model.POS_ITEM_ID].unsqueeze(1)
        if model.msra_window == 1:
            return target
        future = self.train_dataset.future_items(
            interaction[self.config["USER_ID_FIELD"]], interaction[TARGET_POS_FIELD], model.msra_window - 1
        ).to(target.device)
        return torch.cat([target, future], dim=1)

    def post_training_loss(self, interaction):
        model = self.model
        if self.context_ratio < 1.0:
            # sub-sampled RL contexts (spec §7): training batches are shuffled, so the first rows are a random subset
            interaction = interaction[: max(1, int(round(self.context_ratio * len(interaction))))]
        item_seq, item_seq_len = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        G, temperature = model.group_size, model.sample_temperature
        if isinstance(self.refresh, int) and self._pars_steps and self._pars_steps % self.refresh == 0:
            self.snapshot_old_policy()
        self._pars_steps += 1
        on_policy = self.refresh == "batch" or self.old_model is None
        behaviour = model if on_policy else self.old_model
        was_training = model.training
        behaviour.eval()
        with torch.no_grad():
            memory, padding = behaviour.encode(item_seq, item_seq_len)
            paths, masks, sampled_logp = behaviour.sample_paths(memory, padding, G)
            # pi_old by the very function that scores the policy below (not the cached sampling pass): exact ratios
            old_logp = None if on_policy else behaviour.path_log_probs(memory, padding, paths, masks, temperature)

        items = self.msra_targets(interaction).repeat_interleave(G, 0)  # [B*G, K]
        rewards, terms = msra_rewards(
            paths, model.item_vocab_tokens(items), model.item_cat[items], model.token_cat, model.reward_weights, model.msra_gamma
        )
        advantages = group_normalized_advantages(rewards.view(-1, G)).view(-1, 1)

        model.train(self.policy_dropout)  # the policy pass of the ratio: no dropout noise unless asked for
        memory, padding = model.encode(item_seq, item_seq_len)
        logp = model.path_log_probs(memory, padding, paths, masks, temperature)  # a context's G paths share its memory
        model.train(was_training)
        if old_logp is None:  # on-policy: pi_old is this policy
            old_logp = sampled_logp if self.policy_dropout else logp.detach()  # (without dropout: the same values)
        with torch.no_grad():
            ref_memory, ref_padding = self.reference_model.encode(item_seq, item_seq_len)
            ref_logp = self.reference_model.path_log_probs(ref_memory, ref_padding, paths, masks, temperature)
        policy_loss = clipped_policy_loss(logp, old_logp, advantages, self.clip_eps).mean()
        kl = kl_to_reference(logp, ref_logp).mean()
        loss = policy_loss + self.kl_beta * kl
        if self.sft_weight > 0:
            loss = loss + self.sft_weight * model.calculate_loss(interaction)

        grouped = rewards.view(-1, G)
        self.record(
            reward=rewards.mean(),
            advantage_abs_mean=advantages.abs().mean(),
            step_hit=terms["step_hit"].mean(),
            global_path=terms["global_path"].mean(),
            category_hit=terms["category_hit"].mean(),
            step_consistency=terms["step_consistency"].mean(),
            kl=kl.detach(),
            ratio_std=torch.exp(logp.detach() - old_logp).std(),
            zero_variance_groups=(grouped.std(1) == 0).float().mean(),
        )
        return loss
