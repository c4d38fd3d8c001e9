"""
LARES
################################################

Reference:
    Enze Liu, Bowen Zheng, Xiaolei Wang, Wayne Xin Zhao, Jinpeng Wang, Sheng Chen, Ji-Rong Wen.
    "LARES: Latent Reasoning for Sequential Recommendation." arXiv 2505.16865 (2025).

Spec: ../shared/specs/lares.md (the official code, github.com/BishopLiu/LARES @ b09245d, is ground truth).

A SASRec-style recommender that "thinks" in latent space with recurrent depth:

    H   = A(Dropout(LN1(E[seq] + P)))                 pre-block A, run once
    S_0 = state_scale * z,  z ~ TruncNormal(0, state_std, +-3 std)     noise-initialised latent state
    S_i = C(LN2(f(S_{i-1}, H))),  i = 1..T               shared core block C, looped T times over all L positions
    o_i = S_i[last real position];  score(o, E) = o E^T  (or cos(o, E) / tau)

Training depth T is random per forward (Huginn's poisson-lognormal by default), test depth is fixed.
A and C are RecBole's causal TransformerEncoder (SASRec) or, with `lares_encoder: lightsans`, RecBole's
LightTransformerEncoder (LightSANs), whose blocks take the position embedding P as input instead of E + P.

Stage 1, self-supervised pre-training (SPT, `calculate_loss`):
    L_SPT = CE + alpha * TLA + gamma * SLA
    TLA (trajectory-level alignment): symmetric in-batch InfoNCE between the final readouts of a sequence and of
        another training sequence with the same target item, both run to the same depth T2.
    SLA (step-level alignment): symmetric InfoNCE between the final readout and the readout of a random step j.
Stage 2, reinforcement post-training (RPT, `reinforcement_post_training_loss`, driven by `LARESTrainer`):
    G rollouts per sequence (own depth, noise and dropout), reward = Recall@k / NDCG@k of the last step,
    GRPO advantage, per-step objective J_t = exp(l_t - sg(l_t)) * A - beta * KL_t on l_t = log p_t(target).
"""

import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import LightTransformerEncoder, TransformerEncoder
from recbole.utils import ensure_dir
from torch import nn

from recbole_reason.model.layers import transformer_encoder_settings
from recbole_reason.model.rl import group_advantages, kl_to_reference

SAMPLING_SCHEMES = ("poisson-lognormal", "uniform", "poisson-unbounded", "poisson-bounded", "non-recurrent", "constant")
STATE_INIT_METHODS = ("normal", "normal_zero", "zero")
ADAPTER_TYPES = ("add", "concat", "linear")
SEM_FUNCS = ("dot", "cos")
REWARD_METRICS = ("recall", "ndcg")
# The pre-block and the core block: RecBole's causal TransformerEncoder (SASRec, the official code) or RecBole's
# LightTransformerEncoder (LightSANs: low-rank item-to-interest attention plus decoupled position attention).
ENCODERS = ("transformer", "lightsans")

# Column added to the training split so a batch row knows its own index: TLA needs it to draw a partner that is
# not the row itself, and RPT's data filter keeps rows by index.
ROW_INDEX_FIELD = "lares_row_index"


def _require(condition, message):
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------------
# Pure math, shared by the model and the tests
# ---------------------------------------------------------------------------------------------------------------
def symmetric_info_nce(x, y, tau, sem_func):
    """1/2 [NCE(x, y) + NCE(y, x)] with in-batch negatives: row b of x is positive with row b of y only.
    Rows sharing a target are not masked as false negatives (as in the reference code)."""
    if sem_func == "cos":
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.t() / tau
    labels = torch.arange(x.size(0), device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def group_relative_advantage(rewards, eps=1e-4):
    """GRPO advantage A_bg = (r_bg - mean_g r_b) / (std_g r_b + 1e-4) with the *unbiased* std, as the reference
    code: `rl.group_advantages` zscore. (PARS's population std would rescale A by sqrt(G / (G - 1)) relative to the
    KL term and so change the effective beta.) Every row sums to zero; equal rewards give 0."""
    return group_advantages(rewards, "zscore", unbiased=True, eps=eps)


def grpo_per_step_loss(logp, ref_logp, advantages, beta, step_mask):
    """RPT loss: -J_t averaged over the valid steps of each rollout, then over the B*G rollouts, with
    J_t = exp(l_t - sg(l_t)) * A - beta * KL_t (k3 estimator). The ratio is exactly 1: its gradient is A * grad l_t,
    one on-policy update per batch, so no clipping.
    logp, ref_logp, step_mask: [B, G, T_max] (mask 1 on the T_g steps of rollout g); advantages: [B, G]."""
    mask = step_mask.to(logp.dtype)
    ratio = torch.exp(logp - logp.detach())
    kl = kl_to_reference(logp, ref_logp)
    objective = ratio * advantages.unsqueeze(-1) - beta * kl
    per_rollout = -(objective * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    mean_kl = (kl.detach() * mask).sum() / mask.sum().clamp(min=1.0)
    return per_rollout.mean(), mean_kl


def ranking_reward(scores, target, metric, k):
    """Recall@k (1 if the target is in the top k) or NDCG@k (1 / log2(rank + 2) in the top k, else 0), rank 0-based.
    Column 0 is the padding item and never ranks."""
    scores = scores.detach().clone()
    scores[:, 0] = -torch.inf
    target_score = scores.gather(1, target.unsqueeze(1))
    rank = (scores > target_score).sum(1)
    hit = rank < k
    if metric == "recall":
        return hit.float()
    return torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float))


class SameTargetPositives:
    """TLA positive views: for every training row, the other training rows with the same target item.

    Built once by a group-by on the target (argsort), not the reference code's O(N^2) loop, and cached on disk
    under `checkpoint_dir` keyed by a digest of the target column. Read-only and shared by deep copies (the RPT
    reference model) instead of being duplicated."""

    def __init__(self, targets, item_seq, item_seq_len, cache_dir=None):
        self.item_seq, self.item_seq_len = item_seq, item_seq_len
        targets = targets.cpu()
        cache_file = None
        if cache_dir:
            digest = hashlib.sha1(targets.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
            cache_file = os.path.join(cache_dir, f"lares-same-target-{len(targets)}-{digest}.pth")
        if cache_file and os.path.isfile(cache_file):
            cached = torch.load(cache_file, weights_only=True)
            self.order, self.group_start, self.group_size = cached["order"], cached["group_start"], cached["group_size"]
            self.loaded_from_cache = True
        else:
            self.order, self.group_start, self.group_size = self._group_by_target(targets)
            self.loaded_from_cache = False
            if cache_file:
                ensure_dir(cache_dir)
                torch.save({"order": self.order, "group_start": self.group_start, "group_size": self.group_size}, cache_file)
        # position of each row inside the sorted order, to skip the row itself when drawing a partner
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(len(self.order))
        self._device_copies = {}

    @staticmethod
    def _group_by_target(targets):
        order = torch.argsort(targets, stable=True)
        _, counts = torch.unique_consecutive(targets[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        group_of_sorted = torch.repeat_interleave(torch.arange(len(counts)), counts)
        group_start = torch.empty_like(order)
        group_size = torch.empty_like(order)
        group_start[order] = starts[group_of_sorted]
        group_size[order] = counts[group_of_sorted]
        return order, group_start, group_size

    def __deepcopy__(self, memo):
        return self

    def partners(self, rows):
        """One partner row per row, uniform over the *other* rows with the same target; a row alone in its group
        is its own partner. Randomness from torch's global RNG."""
        rows = rows.cpu()
        size = self.group_size[rows]
        offset = torch.floor(torch.rand(len(rows)) * (size - 1).clamp(min=0)).long()
        own = self.rank[rows] - self.group_start[rows]
        offset = torch.where(size > 1, offset + (offset >= own).long(), own)  # skip the row itself
        return self.order[self.group_start[rows] + offset]

    def sequences(self, rows, device):
        if device not in self._device_copies:
            self._device_copies[device] = (self.item_seq.to(device), self.item_seq_len.to(device))
        item_seq, item_seq_len = self._device_copies[device]
        rows = rows.to(device)
        return item_seq[rows], item_seq_len[rows]


class _EvalNoise:
    """A generator seeded from config['seed'] for S_0 at evaluation, reset every time the model enters eval mode:
    under `normal` init every evaluation of the same weights sees the same noise (model selection and test numbers
    are reproducible and comparable across epochs and depths) without touching the global training RNG."""

    def __init__(self, seed):
        self.seed = seed
        self.generators = {}

    def reset(self):
        self.generators.clear()

    def get(self, device):
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[key]

    def __deepcopy__(self, memo):
        return _EvalNoise(self.seed)


class LARES(SequentialRecommender):
    r"""LARES: latent reasoning with a recurrent-depth core block over all positions, trained by SPT then RPT."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # --- architecture -------------------------------------------------------------------------------------
        self.lares_encoder = config["lares_encoder"]
        self.k_interests = config["k_interests"]  # lightsans: latent interests of the item-to-interest aggregation
        self.n_pre_layers = config["n_pre_layers"]
        self.n_core_layers = config["n_core_layers"]
        self.n_heads = config["n_heads"]
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        # The reference code overwrites attn_dropout_prob with hidden_dropout_prob; null keeps that tie.
        attn_dropout_prob = config["attn_dropout_prob"]
        self.attn_dropout_prob = self.hidden_dropout_prob if attn_dropout_prob is None else attn_dropout_prob
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.loss_type = config["loss_type"]
        # --- recurrence -----------------------------------------------------------------------------------------
        self.mean_recurrence = config["mean_recurrence"]
        test_recurrence = config["test_recurrence"]
        self.test_recurrence = self.mean_recurrence if test_recurrence is None else test_recurrence
        self.sampling_scheme = config["sampling_scheme"]
        self.state_init_method = config["state_init_method"]
        self.state_std = config["state_std"]
        self.state_scale = config["state_scale"]
        self.adapter_type = config["adapter_type"]
        # --- SPT ------------------------------------------------------------------------------------------------
        self.alpha = config["alpha"]
        self.gamma = config["gamma"]
        self.tau = config["tau"]
        self.sem_func = config["sem_func"]
        self.same_step = config["same_step"]
        use_cache = config["positive_index_cache"]
        _require(isinstance(use_cache, bool), f"positive_index_cache must be true or false, got {use_cache!r}.")
        # --- RPT (the math lives here; LARESTrainer drives the stage) -------------------------------------------
        self.group_num = config["group_num"]
        self.beta = config["beta"]
        self.reward_metric = str(config["reward_metric"]).lower()
        self.reward_k = config["reward_k"]
        self._validate()

        # --- layers ---------------------------------------------------------------------------------------------
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.input_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)  # LN1
        self.input_dropout = nn.Dropout(self.hidden_dropout_prob)
        # n_pre_layers = 0 is the paper's "w/o pre-block" ablation: H is the embedded input itself.
        self.pre_encoder = self._encoder(self.n_pre_layers) if self.n_pre_layers > 0 else None
        self.core_encoder = self._encoder(self.n_core_layers)
        self.core_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)  # LN2, shared by all steps
        if self.adapter_type == "concat":
            self.adapter = nn.Linear(2 * self.hidden_size, self.hidden_size)
        elif self.adapter_type == "linear":
            self.adapter_logit = nn.Parameter(torch.zeros(()))  # sigma(0) = 1/2: starts as the add adapter
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)

        self._eval_noise = _EvalNoise(int(config["seed"] or 0))
        self.positives = self._build_positives(dataset, config["checkpoint_dir"] if use_cache else None)

    # ----------------------------------------------------------------------------------------------------------
    def _validate(self):
        def positive_int(key, value, minimum=1):
            _require(
                isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum,
                f"{key} must be an integer >= {minimum}, got {value!r}. Set {key}: <int >= {minimum}> in the LARES YAML.",
            )

        def non_negative(key, value):
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                f"{key} must be a number >= 0 (0 switches its term off), got {value!r}.",
            )

        def choice(key, value, options):
            _require(value in options, f"{key} must be one of {list(options)}, got {value!r}.")

        choice("lares_encoder", self.lares_encoder, ENCODERS)
        if self.lares_encoder == "lightsans":
            positive_int("k_interests", self.k_interests)
        positive_int("n_pre_layers", self.n_pre_layers, minimum=0)
        positive_int("n_core_layers", self.n_core_layers)
        positive_int("mean_recurrence", self.mean_recurrence)
        positive_int("test_recurrence", self.test_recurrence)
        choice("sampling_scheme", self.sampling_scheme, SAMPLING_SCHEMES)
        choice("state_init_method", self.state_init_method, STATE_INIT_METHODS)
        _require(
            isinstance(self.state_std, (int, float)) and self.state_std > 0,
            f"state_std must be > 0, got {self.state_std!r} (use state_init_method: zero for a noise-free state).",
        )
        non_negative("state_scale", self.state_scale)
        choice("adapter_type", self.adapter_type, ADAPTER_TYPES)
        for key in ("hidden_dropout_prob", "attn_dropout_prob"):
            value = getattr(self, key)
            _require(isinstance(value, (int, float)) and 0 <= value < 1, f"{key} must be in [0, 1), got {value!r}.")
        non_negative("alpha", self.alpha)
        non_negative("gamma", self.gamma)
        _require(isinstance(self.tau, (int, float)) and self.tau > 0, f"tau must be > 0, got {self.tau!r}.")
        choice("sem_func", self.sem_func, SEM_FUNCS)
        _require(isinstance(self.same_step, bool), f"same_step must be true or false, got {self.same_step!r}.")
        positive_int("group_num", self.group_num, minimum=2)
        non_negative("beta", self.beta)
        choice("reward_metric", self.reward_metric, REWARD_METRICS)
        positive_int("reward_k", self.reward_k)
        _require(
            self.loss_type == "CE",
            f"LARES trains with a full-softmax CE over all items; loss_type must be CE, got {self.loss_type!r}.",
        )

    def _encoder(self, n_layers):
        shared = transformer_encoder_settings(self, n_layers)
        if self.lares_encoder == "lightsans":
            encoder = LightTransformerEncoder(k_interests=self.k_interests, seq_len=self.max_seq_length, **shared)
        else:
            encoder = TransformerEncoder(**shared)
        if self.hidden_act == "gelu":
            for layer in encoder.layer:
                # RecBole's gelu, x * 0.5 * (1 + erf(x / sqrt(2))), is four element-wise kernels; F.gelu is the same
                # function in one (checkpoints are unaffected: an activation has no weights)
                layer.feed_forward.intermediate_act_fn = F.gelu
        return encoder

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def _build_positives(self, dataset, cache_dir):
        """Same-target index over the dataset the model is built with: RecBole passes the training split, so
        positives never come from validation or test rows."""
        inter_feat = dataset.inter_feat
        if inter_feat is None or self.ITEM_SEQ not in inter_feat.interaction:
            return None
        if ROW_INDEX_FIELD not in inter_feat.interaction:
            inter_feat[ROW_INDEX_FIELD] = torch.arange(len(inter_feat))
        return SameTargetPositives(
            inter_feat[self.POS_ITEM_ID], inter_feat[self.ITEM_SEQ], inter_feat[self.ITEM_SEQ_LEN], cache_dir
        )

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self._eval_noise.reset()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Depth and initial state
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_train_depth(self):
        """One recurrence depth T for a whole forward call, from torch's global RNG."""
        r = self.mean_recurrence
        scheme = self.sampling_scheme
        if scheme == "poisson-lognormal":
            # Huginn's recipe: lambda ~ LogNormal(mu, 0.5) with E[lambda] = r, T = Poisson(lambda) + 1, cap 3r.
            sigma = 0.5
            mu = math.log(r) - sigma**2 / 2
            rate = torch.exp(mu + sigma * torch.randn(()))
            return min(int(torch.poisson(rate)) + 1, 3 * r)
        if scheme == "uniform":
            return int(torch.randint(1, 2 * r + 1, ()))
        if scheme in ("poisson-unbounded", "poisson-bounded"):
            depth = int(torch.poisson(torch.tensor(float(r))))
            if scheme == "poisson-bounded":
                depth = min(depth, 2 * r)
            # A 0-step draw would score the pure-noise S_0; at least one core step is always run.
            return max(depth, 1)
        if scheme == "non-recurrent":
            return 1
        return r  # constant

    def current_depth(self):
        return self.sample_train_depth() if self.training else self.test_recurrence

    def initial_state(self, like):
        """S_0 = state_scale * z, z ~ N(0, state_std^2) truncated at +-3 std; zeros per `state_init_method`."""
        noisy = self.state_init_method == "normal" or (self.state_init_method == "normal_zero" and self.training)
        if not noisy:
            return torch.zeros_like(like)
        z = torch.empty_like(like)
        generator = None if self.training else self._eval_noise.get(like.device)
        std = float(self.state_std)
        nn.init.trunc_normal_(z, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return self.state_scale * z

    # ----------------------------------------------------------------------------------------------------------
    # Forward: pre-block once, core block looped
    # ----------------------------------------------------------------------------------------------------------
    def reinject(self, state, h):
        """The adapter f(S, H): the pre-block output H is mixed back into the state before every step."""
        if self.adapter_type == "add":
            return (state + h) / 2
        if self.adapter_type == "concat":
            return self.adapter(torch.cat([state, h], dim=-1))
        weight = torch.sigmoid(self.adapter_logit)
        return weight * state + (1 - weight) * h

    def pre_block(self, item_seq):
        """H = A(Dropout(LN1(E[seq] + P))) and the causal attention mask: what every step re-injects, and the second
        argument of every block. lightsans: H = A(Dropout(LN1(E[seq]))), and that argument is the position
        embedding P, which LightSANs feeds to each of its blocks (decoupled position attention) instead of a mask."""
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        if self.lares_encoder == "lightsans":
            x = self.input_dropout(self.input_layer_norm(self.item_embedding(item_seq)))
            attention_mask = self.position_embedding(position_ids)
        else:
            x = self.item_embedding(item_seq) + self.position_embedding(position_ids).unsqueeze(0)
            x = self.input_dropout(self.input_layer_norm(x))
            attention_mask = self.get_attention_mask(item_seq)
        h = self.pre_encoder(x, attention_mask)[-1] if self.pre_encoder is not None else x
        return h, attention_mask

    @staticmethod
    def readout_layer(layer, hidden, attention_mask, index):
        """RecBole's TransformerLayer at one position per row (`index` [B]) -> [B, d]: keys and values from every
        position, query, residual and feed-forward from that one only. The same output as the layer over all
        positions read at `index`; used for the last layer of the last step, whose other positions nobody reads."""
        attention = layer.multi_head_attention
        rows = torch.arange(hidden.size(0), device=hidden.device)
        query_input = hidden[rows, index].unsqueeze(1)  # [B, 1, d]

        def heads(x):  # [B, n, d] -> [B, heads, n, head]
            return x.view(x.size(0), x.size(1), attention.num_attention_heads, attention.attention_head_size).transpose(1, 2)

        scores = heads(attention.query(query_input)) @ heads(attention.key(hidden)).transpose(-1, -2)
        scores = scores / attention.sqrt_attention_head_size + attention_mask[rows, :, index].unsqueeze(2)
        probs = attention.attn_dropout(attention.softmax(scores))
        context = (probs @ heads(attention.value(hidden))).transpose(1, 2).reshape(hidden.size(0), 1, -1)
        output = attention.LayerNorm(attention.out_dropout(attention.dense(context)) + query_input)
        return layer.feed_forward(output).squeeze(1)

    def reason(self, item_seq, item_seq_len, n_steps, initial_state=None, pre=None, readout_only=False):
        """Runs T = n_steps latent reasoning steps. Returns the final state [B, L, d] (every position refined) and
        the readout of every step at the last real position [B, T, d] (SLA and RPT need the intermediate ones).
        pre: a precomputed `pre_block(item_seq)` (the frozen RPT reference shares one across its rollouts).
        readout_only: the last layer of the last step runs at the readout position only (`readout_layer`); the
        final state is then None."""
        h, attention_mask = self.pre_block(item_seq) if pre is None else pre
        if initial_state is None:
            state = self.initial_state(h)
        else:
            _require(
                initial_state.shape == h.shape,
                f"initial_state must have shape {tuple(h.shape)} ([batch, MAX_ITEM_LIST_LENGTH, hidden_size]), "
                f"got {tuple(initial_state.shape)}.",
            )
            state = initial_state
        readouts = []
        for step in range(n_steps):
            x = self.core_layer_norm(self.reinject(state, h))
            # (LightSANs pools keys over all positions, so its last layer is not computed at one position only)
            if readout_only and step == n_steps - 1 and self.lares_encoder == "transformer":
                for layer in self.core_encoder.layer[:-1]:
                    x = layer(x, attention_mask)
                state = None
                readouts.append(self.readout_layer(self.core_encoder.layer[-1], x, attention_mask, item_seq_len - 1))
            else:
                state = self.core_encoder(x, attention_mask)[-1]
                readouts.append(self.gather_indexes(state, item_seq_len - 1))
        return state, torch.stack(readouts, dim=1)

    def forward(self, item_seq, item_seq_len, n_steps=None, initial_state=None):
        """User representation: the last step's state at the last real position [B, d]."""
        n_steps = self.current_depth() if n_steps is None else n_steps
        _, readouts = self.reason(item_seq, item_seq_len, n_steps, initial_state, readout_only=True)
        return readouts[:, -1]

    def item_scores(self, output, items=None):
        """Scores against the tied item table: dot, or cosine / tau when sem_func is cos. output [..., d]."""
        table = self.item_embedding.weight if items is None else self.item_embedding(items)
        if self.sem_func == "cos":
            output, table = F.normalize(output, dim=-1), F.normalize(table, dim=-1)
            scale = 1.0 / self.tau
        else:
            scale = 1.0
        if items is None:
            return output @ table.t() * scale
        return (output * table).sum(-1) * scale

    # ----------------------------------------------------------------------------------------------------------
    # SPT: CE + alpha * TLA + gamma * SLA
    # ----------------------------------------------------------------------------------------------------------
    def trajectory_level_alignment(self, u, u_positive):
        """TLA: final readouts of two sequences with the same next item, run to the same depth, aligned."""
        return symmetric_info_nce(u, u_positive, self.tau, self.sem_func)

    def step_level_alignment(self, u, o_j):
        """SLA: the readout of step j aligned with the final readout of the same trajectory."""
        return symmetric_info_nce(u, o_j, self.tau, self.sem_func)

    def same_target_sequences(self, interaction):
        _require(
            self.positives is not None,
            "TLA (alpha > 0) needs same-target positives, built from the training split the model is constructed "
            "with (RecBole passes train_data.dataset); this model was built on a dataset without item sequences. "
            "Build it on the training split or set alpha: 0.",
        )
        _require(
            ROW_INDEX_FIELD in interaction.interaction,
            f"the batch has no '{ROW_INDEX_FIELD}' column: TLA batches must come from the training split LARES was "
            "built with (building the model adds the column to it), or set alpha: 0.",
        )
        partner_rows = self.positives.partners(interaction[ROW_INDEX_FIELD])
        return self.positives.sequences(partner_rows, interaction[self.ITEM_SEQ].device)

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]

        # pass 1: recommendation CE at a random depth T1
        output = self.forward(item_seq, item_seq_len)
        rec_loss = self.loss_fct(self.item_scores(output), target)
        tla = sla = rec_loss.new_zeros(())

        depth = self.sample_train_depth()  # T2, shared by the two contrastive passes when same_step
        need_sla = self.gamma > 0 and depth > 1
        if self.alpha > 0 or need_sla:
            # pass 2: the original sequence at T2, keeping every step's readout o_1..o_T2
            _, trajectory = self.reason(item_seq, item_seq_len, depth, readout_only=True)
            u = trajectory[:, -1]
            if self.alpha > 0:
                # pass 3: a same-target training sequence at the same depth
                positive_seq, positive_len = self.same_target_sequences(interaction)
                positive_depth = depth if self.same_step else self.sample_train_depth()
                _, positive_trajectory = self.reason(positive_seq, positive_len, positive_depth, readout_only=True)
                tla = self.trajectory_level_alignment(u, positive_trajectory[:, -1])
            if need_sla:
                j = int(torch.randint(0, depth, ()))  # j = T2 - 1 (the final step) can be drawn, as in the code
                sla = self.step_level_alignment(u, trajectory[:, j])
        return rec_loss, self.alpha * tla, self.gamma * sla

    # ----------------------------------------------------------------------------------------------------------
    # RPT: GRPO-style post-training over latent trajectories
    # ----------------------------------------------------------------------------------------------------------
    def step_target_log_probs(self, readouts, target):
        """l_t = log p_t(target) for every step t [B, T] plus the last step's scores [B, N] (for the reward).
        Only the target column is kept per step (the spec's memory proposal; same maths)."""
        scores = self.item_scores(readouts)  # [B, T, N]
        target_scores = scores.gather(-1, target.view(-1, 1, 1).expand(-1, scores.size(1), 1)).squeeze(-1)
        return target_scores - torch.logsumexp(scores, dim=-1), scores[:, -1]

    def reinforcement_post_training_loss(self, interaction, reference_model):
        """One RPT batch. The policy (self, train mode) runs G rollouts per sequence, each with its own depth T_g,
        noise S_0 and dropout; the frozen reference runs the same T_g in eval mode with its own noise.
        Returns (loss, stats) with stats = mean reward, KL, depth, and the share of groups that carry signal."""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]

        logps, ref_logps, rewards, depths = [], [], [], []
        with torch.no_grad():  # the frozen reference is in eval mode: its pre-block output is the same for all G
            reference_pre = None if reference_model.training else reference_model.pre_block(item_seq)
        for _ in range(self.group_num):
            depth = self.sample_train_depth()
            _, readouts = self.reason(item_seq, item_seq_len, depth, readout_only=True)
            logp, last_scores = self.step_target_log_probs(readouts, target)
            with torch.no_grad():
                _, reference_readouts = reference_model.reason(
                    item_seq, item_seq_len, depth, pre=reference_pre, readout_only=True
                )
                ref_logp, _ = reference_model.step_target_log_probs(reference_readouts, target)
                rewards.append(ranking_reward(last_scores, target, self.reward_metric, self.reward_k))
            logps.append(logp)
            ref_logps.append(ref_logp)
            depths.append(depth)

        # pad the group to T_max with a per-step mask
        t_max = max(depths)
        step_mask = torch.zeros(item_seq.size(0), self.group_num, t_max, device=item_seq.device)
        for g, depth in enumerate(depths):
            step_mask[:, g, :depth] = 1.0
        logp = torch.stack([F.pad(x, (0, t_max - x.size(1))) for x in logps], dim=1)
        ref_logp = torch.stack([F.pad(x, (0, t_max - x.size(1))) for x in ref_logps], dim=1)
        rewards = torch.stack(rewards, dim=1)  # [B, G]
        advantages = group_relative_advantage(rewards)
        loss, mean_kl = grpo_per_step_loss(logp, ref_logp, advantages, self.beta, step_mask)
        stats = {
            "reward": rewards.mean().item(),
            "advantage_abs_mean": advantages.abs().mean().item(),  # NaN / inf here stops RPT, naming it
            "kl": mean_kl.item(),
            "depth": sum(depths) / len(depths),
            "informative_groups": (rewards.std(dim=1) > 0).float().mean().item(),
        }
        return loss, stats

    @torch.no_grad()
    def target_rank(self, interaction):
        """0-based rank of the target among all items at the current (eval) depth: RPT's top-k data filter."""
        scores = self.full_sort_predict(interaction)
        scores[:, 0] = -torch.inf
        target = interaction[self.POS_ITEM_ID]
        return (scores > scores.gather(1, target.unsqueeze(1))).sum(1)

    # ----------------------------------------------------------------------------------------------------------
    # Prediction (eval mode: T = test_recurrence; `initial_state` lets a caller fix S_0)
    # ----------------------------------------------------------------------------------------------------------
    def predict(self, interaction, initial_state=None):
        output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], initial_state=initial_state)
        return self.item_scores(output, interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction, initial_state=None):
        output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], initial_state=initial_state)
        return self.item_scores(output)

    # ----------------------------------------------------------------------------------------------------------
    # Reasoning depth at evaluation (recbole_reason.depth_study)
    # ----------------------------------------------------------------------------------------------------------
    reasoning_depth_key = "test_recurrence"

    def set_reasoning_depth(self, value):
        """Run T latent reasoning steps at evaluation (test_recurrence) without retraining; returns the previous T.
        The core block is shared by all steps, so any T >= 1 runs, below or beyond the training depths."""
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"test_recurrence (the reasoning depth) must be an integer >= 1, got {value!r}.",
        )
        previous, self.test_recurrence = self.test_recurrence, value
        return previous
