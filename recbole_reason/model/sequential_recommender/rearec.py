r"""
ReaRec
################################################
Reference:
    Jiakai Tang et al. "Think Before Recommend: Unleashing the Latent Reasoning Power for Sequential
    Recommendation." arXiv 2503.22675 (v3, 2025).

A SASRec backbone that, after encoding the history, "thinks" for K extra steps: the last output is fed back as a
new token plus a Reasoning Position Embedding (RPE), h0_{n+k} = hL_{n+k-1} + pR_k, under a causal mask, giving
R = [r_0 .. r_K]. Two ways to learn from R:
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

from recbole_reason.model.layers import CachedTransformerEncoder, causal_attention_bias

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
        self._validate(config)

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.reason_position_embedding = nn.Parameter(torch.empty(self.reason_step, self.hidden_size))  # RPE, K x d
        self.trm_encoder = CachedTransformerEncoder(
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            hidden_size=self.hidden_size,
            inner_size=self.inner_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attn_dropout_prob=self.attn_dropout_prob,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )
        # Applied to the item tokens once and to every reasoning token (the official wrapper's LN -> Dropout).
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.input_dropout = nn.Dropout(self.input_dropout_prob)
        self.epoch = 0
        self.apply(self._init_weights)
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
        return {"erl": ("rec", "kl_diversity"), "prl": ("rec", "pta_steps", "rcl")}.get(self.mode, ("rec",))

    @property
    def rcl_active(self):
        return self.mode == "prl" and self.cl_weight > 0 and self.reason_step > 0 and self.epoch >= self.warmup_epochs

    # -- encoding -------------------------------------------------------------------------------------------
    def _embed_items(self, item_seq):
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        return self.input_dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(positions)))

    def _reasoning_token(self, previous_output, step, noise=None):
        """h0_{n+k} = hL_{n+k-1} + pR_k (+ RCL noise), then the shared input LN and dropout. No item position emb."""
        # Steps beyond the trained K (set_reasoning_depth) reuse the last learned RPE: there is none for them.
        rpe = self.reason_position_embedding[min(step, self.reason_position_embedding.size(0) - 1)]
        token = previous_output if self.mode == "naive" else previous_output + rpe
        if noise is not None:
            token = token + noise
        return self.input_dropout(self.LayerNorm(token))

    def _rcl_noise(self, like):
        std = self.noise_std ** 0.5 if self.noise_is_variance else self.noise_std
        return torch.randn_like(like) * std

    def forward(self, item_seq, item_seq_len, noisy_view=False):
        """R = [r_0 .. r_K], shape [B, K+1, H]. With `noisy_view`, also the RCL view (same shape): the batch is
        run twice (the copy differs by dropout at step 0), and at every step the copy's new token is the clean
        copy's previous output + RPE + fresh noise, so noise never compounds."""
        batch = item_seq.size(0)
        if noisy_view:
            item_seq, item_seq_len = item_seq.repeat(2, 1), item_seq_len.repeat(2)
        # Valid keys by length, not by id: reasoning tokens sit after the padding and must never attend to it.
        key_is_valid = torch.arange(item_seq.size(1), device=item_seq.device)[None, :] < item_seq_len[:, None]
        inputs = self._embed_items(item_seq)
        hidden, cache = self.trm_encoder.forward_cached(inputs, causal_attention_bias(key_is_valid, inputs.size(1)))
        outputs = [self.gather_indexes(hidden, item_seq_len - 1)]  # r_0

        reasoning_inputs = []
        for step in range(self.reason_step):
            previous = outputs[-1]
            if noisy_view:
                clean_previous = previous[:batch].repeat(2, 1)
                noise = torch.cat([torch.zeros_like(previous[:batch]), self._rcl_noise(previous[:batch])])
                token = self._reasoning_token(clean_previous, step, noise)
            else:
                token = self._reasoning_token(previous, step)
            key_is_valid = torch.cat([key_is_valid, key_is_valid.new_ones(key_is_valid.size(0), 1)], dim=1)
            if self.kv_cache:
                bias = causal_attention_bias(key_is_valid, 1)
                hidden, cache = self.trm_encoder.forward_cached(token.unsqueeze(1), bias, past=cache)
                outputs.append(hidden[:, -1])
            else:  # full re-encode of [items, reasoning tokens so far]
                reasoning_inputs.append(token.unsqueeze(1))
                extended = torch.cat([inputs] + reasoning_inputs, dim=1)
                hidden, _ = self.trm_encoder.forward_cached(extended, causal_attention_bias(key_is_valid, extended.size(1)))
                outputs.append(hidden[:, -1])
        states = torch.stack(outputs, dim=1)
        return (states[:batch], states[batch:]) if noisy_view else states

    # -- losses ---------------------------------------------------------------------------------------------
    def _logits(self, representation, temperature):
        return torch.matmul(representation, self.item_embedding.weight.t()) / temperature

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

    def calculate_loss(self, interaction):
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
        item_emb = self.item_embedding(interaction[self.ITEM_ID])
        return (representation * item_emb).sum(dim=-1) / self.temperature

    def full_sort_predict(self, interaction):
        return self._logits(self.user_representation(interaction), self.temperature)

    # -- reasoning depth at evaluation (recbole_reason.depth_study) ----------------------------------------------
    reasoning_depth_key = "reason_step"

    def set_reasoning_depth(self, value):
        """Run K' reasoning steps instead of the trained K, without retraining; returns the previous K'.
        K' = 0 is the backbone alone (r_0: SASRec); K' > K reuses the last learned RPE for the extra steps."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"ReaRec: reason_step (the reasoning depth) must be an integer >= 0 (0 = backbone only), got {value!r}")
        if value > 0 and self.reason_position_embedding.size(0) == 0:
            raise ValueError(
                f"ReaRec: this model was trained with reason_step = 0 and has no reasoning position embedding, so it "
                f"only runs at depth 0, got {value}. Train with reason_step >= 1 to study depths."
            )
        previous, self.reason_step = self.reason_step, value
        return previous
