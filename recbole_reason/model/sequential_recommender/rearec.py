r"""
ReaRec
################################################
Reference:
    Jiakai Tang et al. "Think Before Recommend: Unleashing the Latent Reasoning Power for Sequential
    Recommendation." arXiv 2503.22675 (v3, 2025).

A sequential encoder (`rearec_backbone`: RecBole's SASRec by default, BERT4Rec under prefix masking, or GRU4Rec;
see model/reasoning_backbones.py) that, after encoding the history, "thinks" for K extra steps: the last output is
fed back as a new token plus a Reasoning Position Embedding (RPE), h0_{n+k} = hL_{n+k-1} + pR_k, under a causal
mask, giving R = [r_0 .. r_K]. Two ways to learn from R:
    ERL (Ensemble Reasoning Learning): CE on mean(r_0..r_K) minus a KL diversity term between step distributions.
    PRL (Progressive Reasoning Learning): Progressive Temperature Annealing (PTA) over steps plus
        Reasoning-aware Contrastive Learning (RCL) between clean and noise-perturbed reasoning tokens.
Inference runs the K steps with a KV cache (each step costs one token per layer); `kv_cache: False` re-encodes the
whole extended sequence at every step instead (same numbers in eval mode, used to check the cache).
"""

import itertools

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_reason.model.reasoning_backbones import BACKBONES

MODES = ("erl", "prl", "rpe", "naive")


class ReaRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.input_dropout_prob = config["input_dropout_prob"]
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]

        self.reason_step = config["reason_step"]  # K
        self.mode = config["rearec_mode"]
        self.temperature = config["temperature"]  # tau
        self.temp_decay = config["temp_decay"]  # alpha of PTA: tau_k = tau * alpha^(K-k)
        self.kl_weight = config["kl_weight"]  # lambda of ERL
        self.pl_weight = config["pl_weight"]
        self.pl_reduction = config["pl_reduction"]  # 'mean' (official code) or 'sum' (paper Eq. 10)
        self.cl_weight = config["cl_weight"]
        self.noise_std = config["noise_std"]  # gamma of RCL
        self.noise_is_variance = config["noise_is_variance"]  # paper: N(0, gamma I); code: std gamma
        self.warmup_epochs = config["warmup_epochs"]  # RCL is off for the first warmup_epochs epochs
        self.kv_cache = config["kv_cache"]
        # Backbone (model/reasoning_backbones.py); GRU4Rec's own keys, read for every backbone so that each is
        # checked once here.
        self.backbone_name = config["rearec_backbone"]
        self.embedding_size = config["embedding_size"]  # gru4rec: item embedding size (hidden_size is the GRU's)
        self.num_layers = config["num_layers"]  # gru4rec: GRU layers
        self.dropout_prob = config["dropout_prob"]  # gru4rec: dropout on item and reasoning tokens
        self.cloze_weight = config["cloze_weight"]  # bert4rec: weight of BERT4Rec's own cloze (masked-item) loss
        self._validate(config)
        self.backbone = BACKBONES[self.backbone_name]
        if self.cloze_weight > 0:  # fields added to the training batches by RecBole's mask_itemseq transform
            self.MASK_ITEM_SEQ, self.POS_ITEMS, self.MASK_INDEX = (
                config["MASK_ITEM_SEQ"], config["POS_ITEMS"], config["MASK_INDEX"])

        self.backbone.build(self, config)  # the backbone's layers, under RecBole's names
        token_size = self.backbone.token_size(self)
        self.reason_position_embedding = nn.Parameter(torch.empty(self.reason_step, token_size))  # RPE, K x d
        self.epoch = 0
        self.apply(lambda module: self.backbone.init_weights(self, module))
        nn.init.normal_(self.reason_position_embedding, std=self.initializer_range)

    def _validate(self, config):
        def require(condition, message):
            if not condition:
                raise ValueError(f"ReaRec: {message}")

        require(isinstance(self.reason_step, int) and self.reason_step >= 0,
                f"reason_step must be an integer >= 0 (0 = plain SASRec), got {self.reason_step!r}")
        require(self.mode in MODES, f"rearec_mode must be one of {MODES}, got {self.mode!r}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.temp_decay >= 1, f"temp_decay (alpha) must be >= 1, got {self.temp_decay}")
        require(self.pl_reduction in ("mean", "sum"), f"pl_reduction must be 'mean' or 'sum', got {self.pl_reduction!r}")
        require(self.noise_std >= 0, f"noise_std must be >= 0, got {self.noise_std}")
        require(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(self.hidden_size % self.n_heads == 0,
                f"hidden_size ({self.hidden_size}) must be a multiple of n_heads ({self.n_heads})")
        require(config["loss_type"] == "CE", f"loss_type must be CE (full softmax over items), got {config['loss_type']!r}")
        require(self.backbone_name in BACKBONES,
                f"rearec_backbone must be one of {tuple(BACKBONES)}, got {self.backbone_name!r}")
        if self.backbone_name == "gru4rec":
            require(isinstance(self.num_layers, int) and self.num_layers >= 1,
                    f"num_layers (GRU layers of the gru4rec backbone) must be an integer >= 1, got {self.num_layers!r}")
            require(isinstance(self.embedding_size, int) and self.embedding_size >= 1,
                    f"embedding_size (item embedding of the gru4rec backbone) must be an integer >= 1, got {self.embedding_size!r}")
        require(self.cloze_weight >= 0, f"cloze_weight must be >= 0 (0 = no cloze term), got {self.cloze_weight}")
        if self.cloze_weight > 0:
            require(self.backbone_name == "bert4rec",
                    f"cloze_weight > 0 is BERT4Rec's cloze objective: set rearec_backbone: bert4rec (got {self.backbone_name!r}) or cloze_weight: 0")
            require(config["transform"] == "mask_itemseq",
                    f"cloze_weight > 0 needs RecBole's masked training batches: set transform: mask_itemseq (and mask_ratio), got transform: {config['transform']!r}")

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def set_epoch(self, epoch):
        """Called by ReaRecTrainer before every training epoch (RecBole does not tell models the epoch)."""
        self.epoch = epoch

    def loss_names(self):
        names = {"erl": ("rec", "kl_diversity"), "prl": ("rec", "pta_steps", "rcl")}.get(self.mode, ("rec",))
        return names + ("cloze",) if self.cloze_weight > 0 else names

    @property
    def rcl_active(self):
        return self.mode == "prl" and self.cl_weight > 0 and self.reason_step > 0 and self.epoch >= self.warmup_epochs

    # -- encoding -------------------------------------------------------------------------------------------
    def _reasoning_token(self, previous_output, step, noise=None):
        """h0_{n+k} = hL_{n+k-1} + pR_k (+ RCL noise), then the backbone's input normalisation (SASRec, BERT4Rec: the
        shared input LN and dropout; GRU4Rec: its embedding dropout). No item position embedding."""
        # Steps beyond the trained K (set_reasoning_depth) reuse the last learned RPE: there is none for them.
        rpe = self.reason_position_embedding[min(step, self.reason_position_embedding.size(0) - 1)]
        token = previous_output if self.mode == "naive" else previous_output + rpe
        if noise is not None:
            token = token + noise
        return self.backbone.normalize_token(self, token)

    def _rcl_noise(self, like):
        std = self.noise_std ** 0.5 if self.noise_is_variance else self.noise_std
        return torch.randn_like(like) * std

    def forward(self, item_seq, item_seq_len, noisy_view=False):
        """R = [r_0 .. r_K], shape [B, K+1, d]. With `noisy_view`, also the RCL view (same shape): the batch is
        run twice (the copy differs by dropout at step 0), and at every step the copy's new token is the clean
        copy's previous output + RPE + fresh noise, so noise never compounds."""
        batch = item_seq.size(0)
        if noisy_view:
            item_seq, item_seq_len = item_seq.repeat(2, 1), item_seq_len.repeat(2)
        hidden, memory = self.backbone.encode(self, item_seq, item_seq_len)
        outputs = [hidden]  # r_0 (before the backbone's readout)
        for step in range(self.reason_step):
            previous = self.backbone.feedback(self, outputs[-1])
            if noisy_view:
                clean_previous = previous[:batch].repeat(2, 1)
                noise = torch.cat([torch.zeros_like(previous[:batch]), self._rcl_noise(previous[:batch])])
                token = self._reasoning_token(clean_previous, step, noise)
            else:
                token = self._reasoning_token(previous, step)
            hidden, memory = self.backbone.step(self, token, memory)
            outputs.append(hidden)
        states = self.backbone.readout(self, torch.stack(outputs, dim=1))
        return (states[:batch], states[batch:]) if noisy_view else states

    # -- losses ---------------------------------------------------------------------------------------------
    def _logits(self, representation, temperature):
        logits = torch.matmul(representation, self.backbone.item_table(self).t())
        bias = self.backbone.item_bias(self)
        if bias is not None:
            logits = logits + bias
        return logits / temperature

    def ensemble_reasoning_loss(self, states, target):
        """ERL: L = CE(mean_k r_k . E^T / tau) - lambda * mean_{i != j} KL(p_j || sg(p_i)), p_k = softmax(r_k E^T / tau)."""
        rec_loss = F.cross_entropy(self._logits(states.mean(dim=1), self.temperature), target)
        log_probs = F.log_softmax(self._logits(states, self.temperature), dim=-1)  # [B, K+1, N]
        pairs = list(itertools.permutations(range(states.size(1)), 2))
        if not pairs or self.kl_weight == 0:
            return rec_loss, rec_loss.new_zeros(())
        kl_divergence = sum(
            (log_probs[:, j].exp() * (log_probs[:, j] - log_probs[:, i].detach())).sum(-1).mean() for i, j in pairs
        ) / len(pairs)
        return rec_loss, -self.kl_weight * kl_divergence

    def progressive_temperature_annealing(self, states, target):
        """PTA: CE(r_K, tau) and, weighted by pl_weight, CE(r_k, tau * alpha^(K-k)) over the earlier steps k < K."""
        K = self.reason_step
        main_loss = F.cross_entropy(self._logits(states[:, K], self.temperature), target)
        if K == 0 or self.pl_weight == 0:
            return main_loss, main_loss.new_zeros(())
        step_losses = torch.stack([
            F.cross_entropy(self._logits(states[:, k], self.temperature * self.temp_decay ** (K - k)), target)
            for k in range(K)
        ])
        step_loss = step_losses.mean() if self.pl_reduction == "mean" else step_losses.sum()
        return main_loss, self.pl_weight * step_loss

    def reasoning_contrastive_loss(self, states, noisy_states):
        """RCL: per-step InfoNCE for k = 1..K; anchor the noisy r~_k, positive the clean r_k of the same sequence,
        negatives the clean r_k of the other sequences in the batch; similarity dot / tau."""
        target = torch.arange(states.size(0), device=states.device)
        losses = [
            F.cross_entropy(torch.matmul(noisy_states[:, k], states[:, k].t()) / self.temperature, target)
            for k in range(1, states.size(1))
        ]
        return torch.stack(losses).mean()

    def cloze_loss(self, interaction):
        """BERT4Rec's own objective (bert4rec backbone, `cloze_weight`): CE at the positions RecBole's mask_itemseq
        transform replaced by [mask], bidirectional attention, no reasoning, no temperature. As RecBole's BERT4Rec,
        a mask index of 0 is padding of the index list (so position 0 is never scored)."""
        masked_index = interaction[self.MASK_INDEX]  # [B, m]
        output = self.backbone.encode_all_positions(self, interaction[self.MASK_ITEM_SEQ])  # [B, L, d]
        output = output.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, output.size(-1)))  # [B, m, d]
        logits = self._logits(output, 1.0)
        per_position = F.cross_entropy(logits.flatten(0, 1), interaction[self.POS_ITEMS].flatten(), reduction="none")
        is_masked = (masked_index > 0).float().flatten()
        return (per_position * is_masked).sum() / is_masked.sum()

    def calculate_loss(self, interaction):
        losses = self._reasoning_loss(interaction)
        if self.cloze_weight > 0:
            losses = (losses,) if torch.is_tensor(losses) else losses
            return (*losses, self.cloze_weight * self.cloze_loss(interaction))
        return losses

    def _reasoning_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        if self.mode == "erl":
            return self.ensemble_reasoning_loss(self.forward(item_seq, item_seq_len), target)
        if self.mode == "prl":
            if self.rcl_active:
                states, noisy_states = self.forward(item_seq, item_seq_len, noisy_view=True)
                rcl_loss = self.cl_weight * self.reasoning_contrastive_loss(states, noisy_states)
            else:
                states = self.forward(item_seq, item_seq_len)
                rcl_loss = states.new_zeros(())
            return (*self.progressive_temperature_annealing(states, target), rcl_loss)
        # 'rpe' and 'naive' ablations: CE on the last reasoning state only
        states = self.forward(item_seq, item_seq_len)
        return F.cross_entropy(self._logits(states[:, -1], self.temperature), target)

    # -- inference ------------------------------------------------------------------------------------------
    def user_representation(self, interaction):
        """ERL: mean(r_0..r_K); PRL and the ablations: r_K. Never noise at inference."""
        states = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return states.mean(dim=1) if self.mode == "erl" else states[:, -1]

    def predict(self, interaction):
        representation = self.user_representation(interaction)
        items = interaction[self.ITEM_ID]
        scores = (representation * self.backbone.item_table(self)[items]).sum(dim=-1)
        bias = self.backbone.item_bias(self)
        if bias is not None:
            scores = scores + bias[items]
        return scores / self.temperature

    def full_sort_predict(self, interaction):
        return self._logits(self.user_representation(interaction), self.temperature)

    # -- reasoning depth at evaluation (recbole_reason.depth_study) ----------------------------------------------
    reasoning_depth_key = "reason_step"

    def set_reasoning_depth(self, value):
        """Run K' reasoning steps instead of the trained K, without retraining; returns the previous K'.
        K' = 0 is the backbone alone (r_0: SASRec, BERT4Rec or GRU4Rec); K' > K reuses the last learned RPE for the extra steps."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"ReaRec: reason_step (the reasoning depth) must be an integer >= 0 (0 = backbone only), got {value!r}")
        if value > 0 and self.reason_position_embedding.size(0) == 0:
            raise ValueError(
                f"ReaRec: this model was trained with reason_step = 0 and has no reasoning position embedding, so it "
                f"only runs at depth 0, got {value}. Train with reason_step >= 1 to study depths."
            )
        previous, self.reason_step = self.reason_step, value
        return previous
