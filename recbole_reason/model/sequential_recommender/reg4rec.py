r"""REG4Rec
################################################
Reference:
    Haibo Xing et al. "REG4Rec: Reasoning-Enhanced Generative Model for Large-Scale Recommendation Systems."
    arXiv 2508.15308 (ICDE 2026). No public code; this is a re-implementation from ../shared/specs/reg4rec.md.

Items are M *unordered* semantic tokens, one per parallel codebook (the MPQ tokenizer,
`recbole_reason/data/mpq_tokenizer.py`, run by `REG4RecTrainer` before training). An encoder-decoder transformer
reads the history as `<SEP> t_1..t_M` per item and generates the next item's M tokens in a per-sample dynamic order
(CRSS): each step picks one not-yet-used codebook. Inference is a constrained multi-path beam search with CORP
pruning of category-inconsistent paths before the last token; `full_sort_predict` scatters the merged path
log-probabilities into a [B, n_items] score matrix. PARS (GRPO with four rewards) and MSRA (rewards against the next
training items) are the post-training stage of `REG4RecTrainer`; their rewards live here (`pars_rewards`,
`msra_rewards`), the GRPO loss in the trainer.

Ours, not the paper's (issue 15; docs/reg4rec.md): CRSS trains on the order the beam itself picks on the
teacher-forced prefix (`crss_mode: decoding`, `decoding_order`), history slots encode recency
(`position_encoding: recency`), CORP is a soft per-user penalty on tokens of categories foreign to the history
(`corp: user`, `corp_user_penalty`), rollout log-probs are normalised over every remaining codebook as the beam
scores them (`pars_policy_support: remaining`) at `pars_temperature`. The earlier choices stay one setting away.

Vocabulary: PAD=0, BOS=1, EOS=2, SEP=3, then token j of codebook r = 4 + r*D + j (the token carries its codebook).
"""

from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_reason.data.mpq_tokenizer import TokenizerSettings, check_tokenizer_inputs

PAD, BOS, EOS, SEP = 0, 1, 2, 3
N_SPECIAL = 4
UNREACHED = -1e9  # score of items no path reaches: finite so RecBole's top-k never sees NaN or ties with -inf
PRUNED_OFFSET = 1e4  # items reached only by CORP-pruned (refill) paths rank below every surviving path


# ---------------------------------------------------------------------------------------------------------------
# the paper's rewards and the reflection check, on plain tensors (unit-tested on hand-made examples)
# ---------------------------------------------------------------------------------------------------------------
def pars_rewards(paths, target_tokens, token_cat, target_cat):
    """PARS's four rewards for paths [N, S] (vocab ids, generation order) against one target each.

    target_tokens [N, M] vocab ids of the target; token_cat [V] category per token (0 = unknown);
    target_cat [N] the target's category (0 = unknown, never a hit).
    Step-Hit      = sum_s 1[tau_s in g]
    Global-Path   = 1[every step hits]   (the path is the target's token set, in any order)
    Category-Hit  = sum_s 1[cat(tau_s) = c*]
    Step-Consistency = sum_{s<S} 1[cat(tau_s) = cat(tau_{s+1})]   (target-independent)
    """
    step_hit = (paths.unsqueeze(-1) == target_tokens.unsqueeze(1)).any(-1).sum(-1).float()
    global_path = (step_hit == paths.size(1)).float()
    cats = token_cat[paths]
    category_hit = ((cats == target_cat.unsqueeze(1)) & (cats > 0)).sum(-1).float()
    step_consistency = ((cats[:, 1:] == cats[:, :-1]) & (cats[:, 1:] > 0)).sum(-1).float()
    return {"step_hit": step_hit, "global_path": global_path, "category_hit": category_hit, "step_consistency": step_consistency}


def combined_reward(terms, weights, num_steps):
    """R(y) = a_sh SH/M + a_gp GP + a_ch CH/M + a_sc SC/(M-1): normalised so the terms stay comparable as M grows."""
    a_sh, a_gp, a_ch, a_sc = weights
    return (
        a_sh * terms["step_hit"] / num_steps
        + a_gp * terms["global_path"]
        + a_ch * terms["category_hit"] / num_steps
        + a_sc * terms["step_consistency"] / max(num_steps - 1, 1)
    )


def msra_rewards(paths, future_tokens, future_cats, token_cat, weights, gamma):
    """MSRA: target-dependent rewards averaged over the next K items with weights gamma^(k-1), renormalised over the
    items that exist (future_tokens row k is all PAD when item t+k is missing or not a training interaction).

    paths [N, S]; future_tokens [N, K, M] (k = 0 is the target itself); future_cats [N, K].
    Returns (total reward [N], the four terms against the target (k = 0) for logging).
    """
    N, K, _ = future_tokens.shape
    a_sh, a_gp, a_ch, a_sc = weights
    num_steps = paths.size(1)
    decay = gamma ** torch.arange(K, dtype=torch.float, device=paths.device)
    available = (future_tokens[:, :, 0] != PAD).float() * decay  # [N, K]
    target_dependent = torch.zeros(N, K, device=paths.device)
    first = None
    for k in range(K):
        terms = pars_rewards(paths, future_tokens[:, k], token_cat, future_cats[:, k])
        first = first or terms
        target_dependent[:, k] = a_sh * terms["step_hit"] / num_steps + a_gp * terms["global_path"] + a_ch * terms["category_hit"] / num_steps
    weighted = (target_dependent * available).sum(1) / available.sum(1).clamp(min=1e-8)
    return weighted + a_sc * first["step_consistency"] / max(num_steps - 1, 1), first


def corp_consistency(path_cats):
    """CORP's category consistency of partial paths [..., s]: the share of known-category tokens that agree with the
    most frequent category, max_c (1/s') sum 1[cat(tau) = c]. Unknown categories (0) are neutral; a path without any
    known category cannot be judged and counts as consistent (1.0)."""
    known = path_cats > 0
    agree = (path_cats.unsqueeze(-1) == path_cats.unsqueeze(-2)) & known.unsqueeze(-1) & known.unsqueeze(-2)
    mode = agree.sum(-1).max(-1).values.float()
    n_known = known.sum(-1).float()
    return torch.where(n_known > 0, mode / n_known.clamp(min=1), torch.ones_like(mode))


def corp_consistency_after(parent_cats, new_cats):
    """`corp_consistency` of every one-token extension of a path, without building the extended paths: parent_cats
    [..., s] are a path's token categories, new_cats [..., D] those of the D candidate next tokens; returns [..., D].
    The mode count of an extension is max(parent mode, count of the new category in the parent + 1), so the
    result equals corp_consistency(cat([parent, new])) exactly (integer counts, one float division)."""
    known = parent_cats > 0
    agree = (parent_cats.unsqueeze(-1) == parent_cats.unsqueeze(-2)) & known.unsqueeze(-1) & known.unsqueeze(-2)
    parent_mode = agree.sum(-1).max(-1, keepdim=True).values if parent_cats.size(-1) else known.sum(-1, keepdim=True)
    new_known = new_cats > 0
    new_count = ((parent_cats.unsqueeze(-2) == new_cats.unsqueeze(-1)) & known.unsqueeze(-2)).sum(-1) + 1
    mode = torch.where(new_known, torch.maximum(parent_mode, new_count), parent_mode).float()
    n_known = (known.sum(-1, keepdim=True) + new_known.long()).float()
    return torch.where(n_known > 0, mode / n_known.clamp(min=1), torch.ones_like(mode))


class DecodingCache:
    """What the decoder has already computed while prefixes grow one token per step (beam search, PARS rollouts):
    the cross-attention keys/values of the encoder memory, projected once per user and shared by its w prefixes,
    and the self-attention keys/values of every prefix position but the newest, [B, w, heads, s, head] per layer.
    `REG4Rec.beam_logits(prefixes, cache, padding)` then runs only the newest token of each prefix; `reorder`
    follows the beams that survived a step. Same outputs as re-running the decoder over the whole prefixes."""

    def __init__(self, model, memory, memory_padding):
        B, T, _ = memory.shape
        self.heads = model.n_heads
        self.cross = []
        for layer in model.decoder.layers:
            attention = layer.multihead_attn
            _, w_k, w_v = attention.in_proj_weight.chunk(3)
            _, b_k, b_v = attention.in_proj_bias.chunk(3)
            self.cross.append((self.split(F.linear(memory, w_k, b_k)), self.split(F.linear(memory, w_v, b_v))))
        # additive key bias [B, 1, 1, T]: -inf on padded history tokens, as memory_key_padding_mask
        self.memory_bias = torch.zeros(B, 1, 1, T, dtype=memory.dtype, device=memory.device).masked_fill(
            memory_padding.view(B, 1, 1, T), float("-inf"))
        self.past = None  # per layer (key, value) [B, w, heads, s, head]
        self.length = 0

    def split(self, x):  # [B, T, d] -> [B, heads, T, head]
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)

    def reorder(self, parent):
        """parent [B, k]: the prefix each of the k surviving beams extends."""
        if self.past is None:
            return
        index = parent.view(*parent.shape, 1, 1, 1)
        self.past = [tuple(x.gather(1, index.expand(-1, -1, *x.shape[2:])) for x in kv) for kv in self.past]


class REG4Rec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        tokenizer = TokenizerSettings.from_config(config)  # validates every mpq_* key
        # item features / ID-model fallback and token capacity: fail here, before the trainer writes anything
        check_tokenizer_inputs(tokenizer, dataset, getLogger())
        self.M, self.D = tokenizer.num_codebooks, tokenizer.codebook_size
        self.vocab_size = N_SPECIAL + self.M * self.D

        def positive(key, default, cast=int, allow_zero=False):
            value = cast(config[key] if config[key] is not None else default)
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")
            return value

        def choice(key, default, options):
            value = config[key] if config[key] is not None else default
            value = str(value).lower() if not isinstance(value, bool) else ("rule" if value else "off")
            if value not in options:
                raise ValueError(f"{key} must be one of {options}, got '{value}'.")
            return value

        self.d_model = positive("d_model", 128)
        self.n_heads = positive("n_heads", 4)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}).")
        self.n_enc_layers = positive("n_enc_layers", 2)
        self.n_dec_layers = positive("n_dec_layers", 2)
        self.ffn_dim = positive("ffn_dim", 256)
        self.dropout = float(config["dropout"] if config["dropout"] is not None else 0.1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        self.encoder_token_level = bool(config["encoder_token_level"] if config["encoder_token_level"] is not None else True)
        # decoding: the codebook the beam search would pick on the teacher-forced prefix (training = decoding order);
        # confidence: the remaining codebook whose ground-truth token is most probable (the paper's literal rule)
        self.crss_mode = choice("crss_mode", "decoding", ("decoding", "confidence", "random", "fixed"))
        # recency: history slot embedding indexed by distance from the last item (the same for every length);
        # absolute: flattened left-to-right positions (right padding puts the last item elsewhere for every length)
        self.position_encoding = choice("position_encoding", "recency", ("recency", "absolute"))
        self.crss_aux_weight = positive("crss_aux_weight", 0.0, float, allow_zero=True)
        temperature = config["logit_temperature"]
        if temperature is not None and float(temperature) <= 0:
            raise ValueError(f"logit_temperature must be > 0 (or null for dot-product logits), got {temperature}.")
        self.logit_temperature = None if temperature is None else float(temperature)

        self.beam_size = positive("beam_size", 50)
        max_k = self.max_topk = max(config["topk"]) if config["topk"] else 0
        if self.beam_size < max_k:
            raise ValueError(
                f"beam_size must be >= the largest evaluated top-k ({max_k}), got {self.beam_size}: "
                "otherwise Recall@K is capped by the beam. Fix: raise beam_size."
            )
        self.beam_chunk_size = positive("beam_chunk_size", 32)
        self.beam_merge = choice("beam_merge", "max", ("max", "logsumexp"))
        # user: each token whose category the user's history lacks costs corp_penalty / M nats (soft, per user);
        # rule: paths whose own tokens disagree on a category at corp_step are pruned (the same items for every user)
        self.corp = choice("corp", "user", ("off", "rule", "user"))
        self.corp_penalty = positive("corp_penalty", 1.0, float, allow_zero=True)
        self.corp_threshold = float(config["corp_threshold"] if config["corp_threshold"] is not None else 0.5)
        if not 0.0 <= self.corp_threshold <= 1.0:
            raise ValueError(f"corp_threshold must be in [0, 1], got {self.corp_threshold}.")
        self.corp_step = int(config["corp_step"] if config["corp_step"] is not None else self.M - 1)
        if not 1 <= self.corp_step <= self.M - 1:
            raise ValueError(
                f"corp_step must be between 1 and mpq_num_codebooks - 1 = {self.M - 1} (CORP checks a path before its "
                f"last token), got {self.corp_step}. Fix: leave corp_step null for M - 1."
            )

        self.group_size = positive("pars_group_size", 8)
        if self.group_size < 2:
            raise ValueError(f"pars_group_size must be >= 2 (GRPO normalises rewards within a group), got {self.group_size}.")
        self.sample_temperature = positive("pars_temperature", 1.0, float)
        weights = config["pars_reward_weights"] if config["pars_reward_weights"] is not None else [1.0, 1.0, 0.0, 0.0]
        if len(weights) != 4 or any(float(w) < 0 for w in weights):
            raise ValueError(
                "pars_reward_weights must be 4 non-negative weights [step_hit, global_path, category_hit, "
                f"step_consistency], got {weights}."
            )
        self.reward_weights = [float(w) for w in weights]
        self.msra_window = positive("msra_window", 1)
        self.msra_gamma = float(config["msra_gamma"] if config["msra_gamma"] is not None else 0.3)
        if not 0.0 < self.msra_gamma <= 1.0:
            raise ValueError(f"msra_gamma must be in (0, 1], got {self.msra_gamma}.")
        # remaining: a rollout token's log-prob is normalised over every remaining codebook, as the beam scores it
        # (RL then also trains the codebook choice); codebook: renormalised within the chosen codebook
        self.policy_support = choice("pars_policy_support", "remaining", ("remaining", "codebook"))

        # -- layers ----------------------------------------------------------------------------------------
        enc_len = self.max_seq_length * (self.M + 1) if self.encoder_token_level else self.max_seq_length
        self.token_embedding = nn.Embedding(self.vocab_size, self.d_model, padding_idx=PAD)
        if self.position_encoding == "absolute":
            self.position_embedding = nn.Embedding(enc_len, self.d_model)  # flattened encoder positions
        elif self.encoder_token_level:
            self.position_embedding = nn.Embedding(self.M + 1, self.d_model)  # <SEP>, t_1..t_M within an item
        else:
            self.position_embedding = None
        # which history item a token belongs to: its slot (absolute) or its distance from the last item (recency)
        self.slot_embedding = nn.Embedding(self.max_seq_length, self.d_model)
        self.step_embedding = nn.Embedding(self.M + 1, self.d_model)  # decoder step index
        self.item_fusion = None if self.encoder_token_level else nn.Linear(self.M * self.d_model, self.d_model)
        self.input_norm = nn.LayerNorm(self.d_model)
        self.input_dropout = nn.Dropout(self.dropout)
        enc_layer = nn.TransformerEncoderLayer(self.d_model, self.n_heads, self.ffn_dim, self.dropout, batch_first=True, norm_first=True)
        dec_layer = nn.TransformerDecoderLayer(self.d_model, self.n_heads, self.ffn_dim, self.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc_layer, self.n_enc_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec_layer, self.n_dec_layers)
        self.output_norm = nn.LayerNorm(self.d_model)

        # -- tokenizer output (filled by REG4RecTrainer's tokenizer stage; saved in the checkpoint) ----------
        self.register_buffer("item2tokens", torch.full((self.n_items, self.M), -1, dtype=torch.long))
        self.register_buffer("item_cat", torch.zeros(self.n_items, dtype=torch.long))
        self.register_buffer("token_cat", torch.zeros(self.vocab_size, dtype=torch.long))
        self.register_buffer("tokens_ready", torch.zeros((), dtype=torch.bool))
        token_codebook = torch.full((self.vocab_size,), -1, dtype=torch.long)
        token_codebook[N_SPECIAL:] = torch.arange(self.M).repeat_interleave(self.D)
        self.register_buffer("token_codebook", token_codebook, persistent=False)
        self._posting_key, self._posting = None, None
        self._tables_key, self._tables = None, None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    # -- tokens --------------------------------------------------------------------------------------------
    def set_item_tokens(self, tokens):
        """Install the tokenizer's tables (local token ids [n_items, M], categories) as buffers."""
        if tuple(tokens.item2tokens.shape) != (self.n_items, self.M):
            raise ValueError(
                f"item tokens have shape {tuple(tokens.item2tokens.shape)}, the model expects ({self.n_items}, {self.M}): "
                "the token cache belongs to another dataset or mpq_num_codebooks."
            )
        self.item2tokens.copy_(tokens.item2tokens)
        self.item_cat.copy_(tokens.item_cat)
        token_cat = torch.zeros(self.vocab_size, dtype=torch.long)
        token_cat[N_SPECIAL:] = tokens.token_cat.reshape(-1)
        self.token_cat.copy_(token_cat)
        self.tokens_ready.fill_(True)

    def item_vocab_tokens(self, items):
        """item ids [...] -> vocab ids [..., M] (PAD for the padding item)."""
        local = self.item2tokens[items]
        offsets = N_SPECIAL + torch.arange(self.M, device=local.device) * self.D
        return torch.where(local >= 0, local + offsets, torch.full_like(local, PAD))

    def _check_tokens(self):
        if not bool(self.tokens_ready):
            raise RuntimeError(
                "REG4Rec has no item tokens yet: train it with REG4RecTrainer (its tokenizer stage fills them) or load a "
                "REG4Rec checkpoint."
            )

    def posting(self):
        """[V, n_items] bool: which items carry each token (posting lists as bitsets), and [V] token-in-use mask."""
        key = (self.item2tokens.data_ptr(), int(self.item2tokens.sum()))
        if self._posting_key != key:
            vocab = self.item_vocab_tokens(torch.arange(self.n_items, device=self.item2tokens.device))
            posting = torch.zeros(self.vocab_size, self.n_items, dtype=torch.bool, device=vocab.device)
            items = torch.arange(self.n_items, device=vocab.device).unsqueeze(1).expand_as(vocab)
            posting[vocab[1:].reshape(-1), items[1:].reshape(-1)] = True
            posting[PAD] = False
            self._posting, self._posting_key = posting, key
        return self._posting

    def decoding_tables(self):
        """The constraint structure of decoding, built once per item-token table (not per batch or step):
        posting lists [V, P] (ascending item ids carrying each token, 0-padded; P = the longest list), each item's
        vocab tokens [n_items, M] (PAD for the padding item) and the tokens some item carries [V]. A partial path's
        still-possible items are then a short id list (its first token's posting list, filtered by every later
        token), not a bitset over the whole catalogue."""
        key = (self.item2tokens.data_ptr(), int(self.item2tokens.sum()))
        if self._tables_key != key:
            device = self.item2tokens.device
            item_tokens = self.item_vocab_tokens(torch.arange(self.n_items, device=device))
            pairs = item_tokens[1:].reshape(-1)
            owners = torch.arange(1, self.n_items, device=device).repeat_interleave(self.M)
            real = pairs != PAD
            pairs, owners = pairs[real], owners[real]
            order = torch.argsort(pairs * self.n_items + owners)  # by token, then by item
            pairs, owners = pairs[order], owners[order]
            counts = torch.bincount(pairs, minlength=self.vocab_size)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(pairs), device=device) - starts[pairs]
            lists = torch.zeros(self.vocab_size, max(int(counts.max()), 1), dtype=torch.long, device=device)
            lists[pairs, slot] = owners
            self._tables, self._tables_key = (lists, item_tokens, counts > 0), key
        return self._tables

    # -- encoder / decoder ----------------------------------------------------------------------------------
    def encode(self, item_seq, item_seq_len):
        """History -> memory [B, T, d] and its padding mask. Token level: `<SEP> t_1..t_M` per item."""
        tokens = self.item_vocab_tokens(item_seq)  # [B, L, M]
        B, L, _ = tokens.shape
        steps = torch.arange(L, device=item_seq.device)
        if self.position_encoding == "recency":  # right-padded: item l is item_seq_len - 1 - l steps before the last
            slots = self.slot_embedding((item_seq_len.view(B, 1) - 1 - steps).clamp(min=0))  # [B, L, d]
        else:
            slots = self.slot_embedding(steps).expand(B, L, -1)
        if self.encoder_token_level:
            sep = torch.where(item_seq > 0, torch.full_like(item_seq, SEP), torch.full_like(item_seq, PAD))
            seq = torch.cat([sep.unsqueeze(-1), tokens], dim=-1)  # [B, L, M+1]
            h = self.token_embedding(seq) + slots.unsqueeze(2)
            if self.position_encoding == "recency":
                h = h + self.position_embedding.weight  # position within the item: <SEP>, t_1..t_M
            h = h.reshape(B, L * (self.M + 1), -1)
            padding = seq.reshape(B, -1) == PAD
        else:
            h = self.item_fusion(self.token_embedding(tokens).reshape(B, L, -1)) + slots
            padding = item_seq == 0
        if self.position_encoding == "absolute":
            h = h + self.position_embedding(torch.arange(h.size(1), device=h.device))
        h = self.input_dropout(self.input_norm(h))
        return self.encoder(h, src_key_padding_mask=padding), padding

    def next_token_logits(self, decoder_input, memory, memory_padding, last_only=False):
        """Decoder over `<BOS> prefix` [N, s]: logits [N, s, V] (tied output embedding, or cosine / temperature).
        last_only: only the last position is projected onto the vocabulary ([N, 1, V]), as decoding needs."""
        s = decoder_input.size(1)
        h = self.token_embedding(decoder_input) + self.step_embedding(torch.arange(s, device=decoder_input.device))
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=h.device), 1)
        h = self.decoder(self.input_dropout(h), memory, tgt_mask=causal, memory_key_padding_mask=memory_padding)
        return self.vocab_logits(self.output_norm(h[:, -1:] if last_only else h))

    def vocab_logits(self, h):
        """Tied output projection of normalised decoder states: dot product, or cosine / temperature."""
        if self.logit_temperature is None:
            return h @ self.token_embedding.weight.t()
        return F.normalize(h, dim=-1) @ F.normalize(self.token_embedding.weight, dim=-1).t() / self.logit_temperature

    def beam_logits(self, prefixes, memory, memory_padding):
        """Last-position logits [B, w, V] for w prefixes [B, w, s] per user (beams, or rollouts of one context).
        `memory` is a `DecodingCache` when decoding step by step: only the newest token of each prefix is run
        (`cached_beam_logits`). Otherwise the w prefixes of a user are laid side by side in one decoder sequence
        with a block-diagonal causal mask: the same result as w separate sequences, the memory projected once."""
        if isinstance(memory, DecodingCache):
            return self.cached_beam_logits(prefixes, memory)
        return self.grouped_logits(prefixes, memory, memory_padding, last_only=True)

    def grouped_logits(self, prefixes, memory, memory_padding, last_only=False):
        """Logits [B, w, s, V] (last_only: [B, w, V]) of w decoder inputs [B, w, s] per user, laid side by side in
        one decoder sequence with a block-diagonal causal mask: the same as w separate sequences over the user's
        memory, whose cross-attention keys/values are then projected once instead of w times."""
        B, w, s = prefixes.shape
        steps = torch.arange(s, device=prefixes.device)
        h = (self.token_embedding(prefixes) + self.step_embedding(steps)).reshape(B, w * s, -1)
        block, position = torch.arange(w, device=h.device).repeat_interleave(s), steps.repeat(w)
        blocked = (block.unsqueeze(1) != block.unsqueeze(0)) | (position.unsqueeze(0) > position.unsqueeze(1))
        h = self.decoder(self.input_dropout(h), memory, tgt_mask=blocked, memory_key_padding_mask=memory_padding)
        h = h.reshape(B, w, s, -1)
        return self.vocab_logits(self.output_norm(h[:, :, -1] if last_only else h))

    def cached_beam_logits(self, prefixes, cache):
        """`beam_logits` from a `DecodingCache` holding the keys/values of prefixes[..., :-1]: each pre-LN decoder
        layer (`nn.TransformerDecoderLayer`, norm_first) is applied to the newest token only, with its own
        weights, and the cache grows by that token. Cost per step: w tokens per user instead of w * s."""
        B, w, s = prefixes.shape
        if cache.length != s - 1:
            raise RuntimeError(f"the decoding cache holds {cache.length} positions, the prefixes need {s - 1}")
        heads, d = self.n_heads, self.d_model
        h = self.token_embedding(prefixes[:, :, -1]) + self.step_embedding.weight[s - 1]
        h = self.input_dropout(h)  # [B, w, d]
        present = []
        for index, layer in enumerate(self.decoder.layers):
            # self-attention: the newest token of each prefix over that prefix's positions (causal by construction)
            attention = layer.self_attn
            q, k, v = F.linear(layer.norm1(h), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (x.reshape(B * w, 1, heads, -1).transpose(1, 2) for x in (q, k, v))  # [B*w, heads, 1, head]
            k, v = k.view(B, w, heads, 1, -1), v.view(B, w, heads, 1, -1)
            if cache.past is not None:
                k = torch.cat([cache.past[index][0], k], dim=3)
                v = torch.cat([cache.past[index][1], v], dim=3)
            present.append((k, v))
            dropout = attention.dropout if self.training else 0.0
            a = F.scaled_dot_product_attention(q, k.flatten(0, 1), v.flatten(0, 1), dropout_p=dropout)
            h = h + layer.dropout1(attention.out_proj(a.transpose(1, 2).reshape(B, w, d)))
            # cross-attention: the w prefixes of a user share its memory keys/values
            attention = layer.multihead_attn
            w_q, b_q = attention.in_proj_weight[:d], attention.in_proj_bias[:d]
            q = F.linear(layer.norm2(h), w_q, b_q).view(B, w, heads, -1).transpose(1, 2)  # [B, heads, w, head]
            key, value = cache.cross[index]
            dropout = attention.dropout if self.training else 0.0
            a = F.scaled_dot_product_attention(q, key, value, attn_mask=cache.memory_bias, dropout_p=dropout)
            h = h + layer.dropout2(attention.out_proj(a.transpose(1, 2).reshape(B, w, d)))
            h = h + layer._ff_block(layer.norm3(h))
        cache.past, cache.length = present, s
        return self.vocab_logits(self.output_norm(h))

    def codebook_mask(self, used):
        """used [..., M] bool -> [..., V] bool: tokens of the codebooks not yet used (specials never)."""
        allowed = (~used).repeat_interleave(self.D, dim=-1)
        return torch.cat([torch.zeros(*used.shape[:-1], N_SPECIAL, dtype=torch.bool, device=used.device), allowed], -1)

    @staticmethod
    def masked_log_softmax(logits, mask):
        return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)

    # -- CRSS: training order ------------------------------------------------------------------------------
    @torch.no_grad()
    def crss_order(self, memory, memory_padding, target, item_seq=None, item_seq_len=None):
        """[B, M] codebook order per sample (no gradient through the choice). decoding: at each step the codebook
        the beam search picks on the teacher-forced prefix (`decoding_order`); confidence: the remaining codebook
        whose ground-truth token the model is most confident in; random: a random permutation; fixed: 0..M-1."""
        B = target.size(0)
        if self.crss_mode == "decoding":
            encoded = None if self.training and self.dropout > 0 else (memory, memory_padding)
            return self.decoding_order(item_seq, item_seq_len, target, encoded)
        if self.crss_mode == "fixed":
            return torch.arange(self.M, device=target.device).expand(B, -1)
        if self.crss_mode == "random":
            return torch.rand(B, self.M, device=target.device).argsort(-1)
        used = torch.zeros(B, self.M, dtype=torch.bool, device=target.device)
        prefix = torch.full((B, 1), BOS, dtype=torch.long, device=target.device)
        order = []
        for _ in range(self.M):
            logits = self.next_token_logits(prefix, memory, memory_padding, last_only=True)[:, -1]
            logp = self.masked_log_softmax(logits, self.codebook_mask(used))
            confidence = logp.gather(1, target).masked_fill(used, float("-inf"))  # p(g_r | prefix), r remaining
            r = confidence.argmax(-1)
            order.append(r)
            used[torch.arange(B), r] = True
            prefix = torch.cat([prefix, target.gather(1, r.unsqueeze(1))], dim=1)
        return torch.stack(order, dim=1)

    @torch.no_grad()
    def decoding_order(self, item_seq, item_seq_len, target, encoded=None):
        """[B, M] the order in which the beam search would emit the target's tokens: at each step
        `_crss_choice` (the rule `_beam_search_chunk` applies, on the same cached decoder, in eval mode, under the
        same validity constraint) on the prefix of the target's tokens chosen so far. Training on this order makes
        training and decoding agree by construction. `encoded`: the eval-mode (memory, padding), if at hand."""
        was_training = self.training
        self.eval()  # the beam decodes without dropout: so must the choice
        try:
            memory, padding = encoded if encoded is not None else self.encode(item_seq, item_seq_len)
            B, device = target.size(0), target.device
            cache, tables = DecodingCache(self, memory, padding), self.decoding_tables()
            used = torch.zeros(B, self.M, dtype=torch.bool, device=device)
            prefix = torch.full((B, 1), BOS, dtype=torch.long, device=device)
            candidates, order = None, []
            for _ in range(self.M):
                logits = self.beam_logits(prefix.unsqueeze(1), cache, padding).reshape(B, -1)
                _, codebook = self._crss_choice(logits, used, self._valid_tokens(candidates, B, tables))
                token = target.gather(1, codebook.unsqueeze(1)).squeeze(1)
                order.append(codebook)
                used[torch.arange(B, device=device), codebook] = True
                prefix = torch.cat([prefix, token.unsqueeze(1)], dim=1)
                candidates = self._extend_candidates(candidates, token, tables)
        finally:
            self.train(was_training)
        return torch.stack(order, dim=1)

    def calculate_loss(self, interaction):
        self._check_tokens()
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        memory, padding = self.encode(item_seq, item_seq_len)
        target = self.item_vocab_tokens(interaction[self.POS_ITEM_ID])  # [B, M], column r = codebook r
        order = self.crss_order(memory, padding, target, item_seq, item_seq_len)
        path = target.gather(1, order)
        decoder_input = torch.cat([torch.full_like(path[:, :1], BOS), path[:, :-1]], dim=1)
        logits = self.next_token_logits(decoder_input, memory, padding)  # [B, M, V]
        used_before = torch.zeros_like(order, dtype=torch.bool).unsqueeze(1).repeat(1, self.M, 1)  # [B, step, M]
        for s in range(1, self.M):
            used_before[:, s] = used_before[:, s - 1]
            used_before[torch.arange(path.size(0)), s, order[:, s - 1]] = True
        logp = self.masked_log_softmax(logits, self.codebook_mask(used_before))
        loss = -logp.gather(2, path.unsqueeze(-1)).mean()
        if self.crss_aux_weight > 0:
            # multi-positive: -log sum_{r remaining} p(g_r) teaches every order, not only the most confident one
            gt = logp.gather(2, target.unsqueeze(1).expand(-1, self.M, -1)).masked_fill(used_before, float("-inf"))
            loss = loss + self.crss_aux_weight * (-torch.logsumexp(gt, dim=-1).mean())
        return loss

    # -- constrained decoding ------------------------------------------------------------------------------
    # A partial path's still-possible items are an id list [N, P] (0 = empty slot), or None at the root (every
    # item with tokens): its first token's posting list, filtered by each later token (`decoding_tables`).
    # The tables are looked up once per search and passed down: checking them costs a reduction over the token
    # table (and a host sync on a GPU), not worth paying at every step.
    def _valid_tokens(self, candidates, n, tables):
        """[n, V] bool: tokens some still-possible item carries (the union of the candidates' token sets)."""
        _, item_tokens, in_use = tables
        if candidates is None:
            return in_use.unsqueeze(0).expand(n, -1)
        valid = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=candidates.device)
        valid.scatter_(1, item_tokens[candidates].flatten(1), True)  # empty slots are item 0, whose tokens are PAD
        valid[:, PAD] = False
        return valid

    def _extend_candidates(self, candidates, token, tables):
        """Candidates [..., P] (None = all) after appending `token` [...]: those carrying it, still in ascending
        order, trimmed to the longest remaining list."""
        lists, item_tokens, _ = tables
        if candidates is None:
            return lists[token]
        codebook = ((token - N_SPECIAL) // self.D).unsqueeze(-1).expand_as(candidates)
        kept = torch.where(item_tokens[candidates, codebook] == token.unsqueeze(-1), candidates, 0)
        kept = kept.gather(-1, torch.sort((kept == 0).to(torch.uint8), dim=-1, stable=True).indices)  # items first
        return kept[..., : max(int((kept > 0).sum(-1).max()), 1)]

    def _crss_choice(self, logits, used, valid):
        """One CRSS step under the validity constraint `valid` [N, V]: log-probs of the allowed tokens per codebook
        [N, M, D] (softmax over the unused codebooks' tokens, -inf where not allowed) and the chosen codebook [N]:
        the remaining one whose best valid token is most probable."""
        # on the [N, M, D] view of the item tokens: the special tokens are never allowed, and a codebook's mask is
        # one flag broadcast over its D tokens instead of a [N, V] mask
        N = logits.size(0)
        per_codebook = logits[:, N_SPECIAL:].reshape(N, self.M, self.D).masked_fill(used.unsqueeze(-1), float("-inf"))
        logp = torch.log_softmax(per_codebook.view(N, -1), dim=-1).view(N, self.M, self.D)
        logp = logp.masked_fill(~valid[:, N_SPECIAL:].reshape(N, self.M, self.D), float("-inf"))
        return logp, logp.max(-1).values.argmax(-1)

    def _crss_step(self, logits, used, valid):
        """`_crss_choice` plus the chosen codebook's token mask [N, V] (the support a rollout samples from)."""
        _, codebook = self._crss_choice(logits, used, valid)
        step_mask = self.codebook_mask(used) & valid & (self.token_codebook.unsqueeze(0) == codebook.unsqueeze(1))
        return codebook, step_mask

    @torch.no_grad()
    def beam_search(self, item_seq, item_seq_len, beam_size=None, corp=None):
        """Multi-path beam search over unordered tokens -> item scores [B, n_items]. Users are decoded together in
        chunks of `beam_chunk_size` (a memory bound only: the scores do not depend on it)."""
        self._check_tokens()
        beam_size = beam_size or self.beam_size
        corp = self.corp if corp is None else corp
        scores = []
        for start in range(0, item_seq.size(0), self.beam_chunk_size):
            chunk = slice(start, start + self.beam_chunk_size)
            scores.append(self._beam_search_chunk(item_seq[chunk], item_seq_len[chunk], beam_size, corp))
        return torch.cat(scores, dim=0)

    def _beam_search_chunk(self, item_seq, item_seq_len, W, corp):
        device = item_seq.device
        B, M, D = item_seq.size(0), self.M, self.D
        memory, padding = self.encode(item_seq, item_seq_len)
        cache = DecodingCache(self, memory, padding)  # every step runs only the newest token of each beam
        tables = self.decoding_tables()
        # state per (user, beam); beams grow from a single root
        tokens = torch.full((B, 1, 0), BOS, dtype=torch.long, device=device)
        used = torch.zeros(B, 1, M, dtype=torch.bool, device=device)
        score = torch.zeros(B, 1, device=device)
        pruned = torch.zeros(B, 1, dtype=torch.bool, device=device)
        candidates = None  # [B, w, P] still-possible items of each beam; None = every item
        out = torch.full((B, self.n_items), UNREACHED, device=device)
        history_cats = self.history_categories(item_seq) if corp == "user" else None
        for step in range(M):
            w = tokens.size(1)
            prefixes = torch.cat([torch.full((B, w, 1), BOS, dtype=torch.long, device=device), tokens], 2)
            logits = self.beam_logits(prefixes, cache, padding).reshape(B * w, -1)
            flat_candidates = None if candidates is None else candidates.reshape(B * w, -1)
            valid = self._valid_tokens(flat_candidates, B * w, tables)
            per_codebook, codebook = self._crss_choice(logits, used.reshape(B * w, M), valid)
            codebook_logp = per_codebook[torch.arange(B * w, device=device), codebook]  # [B*w, D]
            token_ids = N_SPECIAL + codebook.reshape(B, w, 1) * D + torch.arange(D, device=device)  # [B, w, D]
            if history_cats is not None:  # CORP (user): tokens of categories foreign to the user's history cost
                codebook_logp = codebook_logp - self.corp_user_penalty(history_cats, token_ids).reshape(B * w, D)
            total = (score.reshape(B * w, 1) + codebook_logp).reshape(B, w * D)
            if step == M - 1:
                self._scatter_final(out, flat_candidates, codebook, codebook_logp, score.reshape(-1), pruned.reshape(-1), B, w)
                break
            inconsistent = torch.zeros(B, w, D, dtype=torch.bool, device=device)
            if corp == "rule" and step + 1 == self.corp_step:
                # CORP: would the path be category-consistent after this token? inconsistent ones go to the back
                inconsistent = corp_consistency_after(self.token_cat[tokens], self.token_cat[token_ids]) < self.corp_threshold
            parent_pruned = pruned.unsqueeze(-1).expand(-1, -1, D)
            rank = total - PRUNED_OFFSET * (inconsistent | parent_pruned).reshape(B, w * D).float()
            k = min(W, w * D)
            top = rank.topk(k, dim=1).indices  # survivors first; pruned paths only refill a beam short of W
            parent = top // D
            gather = lambda x: x.gather(1, parent.view(B, k, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
            new_token = token_ids.reshape(B, w * D).gather(1, top)
            tokens = torch.cat([gather(tokens), new_token.unsqueeze(-1)], dim=-1)
            used = gather(used).clone()
            used.scatter_(2, ((new_token - N_SPECIAL) // D).unsqueeze(-1), True)
            candidates = self._extend_candidates(None if candidates is None else gather(candidates), new_token, tables)
            cache.reorder(parent)
            pruned = (inconsistent | parent_pruned).reshape(B, w * D).gather(1, top)
            score = total.gather(1, top)
        return out

    def history_categories(self, item_seq):
        """[B, n_categories + 1] bool: the categories of each user's history items (column 0, unknown, never set)."""
        cats = self.item_cat[item_seq]
        seen = torch.zeros(item_seq.size(0), int(self.item_cat.max()) + 1, dtype=torch.bool, device=item_seq.device)
        seen.scatter_(1, cats, True)
        seen[:, 0] = False
        return seen

    def corp_user_penalty(self, history_cats, token_ids):
        """CORP as a per-user consistency signal: corp_penalty / M nats for each token [B, ...] whose (known) category
        is not among the user's history categories. A path of M such tokens loses corp_penalty; an item is only
        penalised for the users it is foreign to, and only softly, so no item is buried for every user."""
        B = token_ids.size(0)
        cats = self.token_cat[token_ids].reshape(B, -1)
        foreign = (cats > 0) & ~history_cats.gather(1, cats)
        return (self.corp_penalty / self.M) * foreign.reshape(token_ids.shape).float()

    def _scatter_final(self, out, candidates, codebook, codebook_logp, score, pruned, B, w):
        """Last token: every still-possible item completes exactly one beam; merge beams reaching the same item."""
        rows, slots = (candidates > 0).nonzero(as_tuple=True)  # row-major, items ascending within a row
        items = candidates[rows, slots]
        local = self.item2tokens[items, codebook[rows]]
        path_score = score[rows] + codebook_logp[rows, local]
        keep = torch.isfinite(path_score)
        rows, items, path_score = rows[keep], items[keep], path_score[keep]
        path_score = path_score.clamp(min=-PRUNED_OFFSET / 2) - PRUNED_OFFSET * pruned[rows].float()
        users = rows // w
        if self.beam_merge == "max":
            out.view(-1).scatter_reduce_(0, users * out.size(1) + items, path_score, reduce="amax", include_self=False)
        else:
            shift = torch.full((B,), float("-inf"), device=out.device).scatter_reduce(0, users, path_score, "amax")
            mass = torch.zeros_like(out).view(-1).index_add_(0, users * out.size(1) + items, torch.exp(path_score - shift[users]))
            mass = mass.view_as(out)
            out.copy_(torch.where(mass > 0, torch.log(mass.clamp(min=1e-30)) + shift.unsqueeze(1), out))

    def full_sort_predict(self, interaction):
        return self.beam_search(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    # -- PARS rollouts ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_paths(self, memory, padding, group_size=None, temperature=None):
        """G CRSS paths per context under the validity constraint, decoded step by step with a `DecodingCache`:
        the codebook is the CRSS choice, the token is sampled inside it at `pars_temperature`.
        Returns paths [N, M] vocab ids in generation order, the policy's support per step [N, M, V] (reused for the
        old / new / reference log-probs: every remaining codebook's tokens with `pars_policy_support: remaining`,
        the chosen codebook's valid tokens with `codebook`) and the sampling-time log-probs [N, M] under that
        support at the same temperature (N = B * G)."""
        self._check_tokens()
        G = group_size or self.group_size
        temperature = temperature or self.sample_temperature
        B, device = memory.size(0), memory.device
        N = B * G
        cache = DecodingCache(self, memory, padding)
        tables = self.decoding_tables()
        candidates = None
        used = torch.zeros(N, self.M, dtype=torch.bool, device=device)
        paths = torch.full((N, 0), BOS, dtype=torch.long, device=device)
        masks, logps = [], []
        for step in range(self.M):
            prefixes = torch.cat([torch.full((N, 1), BOS, dtype=torch.long, device=device), paths], 1)
            logits = self.beam_logits(prefixes.view(B, G, -1), cache, padding).reshape(N, -1)
            codebook, step_mask = self._crss_step(logits, used, self._valid_tokens(candidates, N, tables))
            probs = torch.softmax((logits / temperature).masked_fill(~step_mask, float("-inf")), dim=-1)
            token = torch.multinomial(probs, 1).squeeze(1)
            support = step_mask if self.policy_support == "codebook" else self.codebook_mask(used)
            logps.append(self.masked_log_softmax(logits / temperature, support).gather(1, token.unsqueeze(1)).squeeze(1))
            masks.append(support)
            paths = torch.cat([paths, token.unsqueeze(1)], 1)
            used[torch.arange(N, device=device), codebook] = True
            candidates = self._extend_candidates(candidates, token, tables)
        return paths, torch.stack(masks, 1), torch.stack(logps, 1)

    def path_log_probs(self, memory, padding, paths, masks, temperature=1.0):
        """log pi(tau_s | x, tau_<s) [N, M] with the stored step masks (same support as at sampling), at `temperature`
        (the rollouts' pars_temperature, so that old, new and reference log-probs are of the sampling policy).
        memory [B, T, d] of B contexts, paths [N, M] with N = B * G: G paths per context, grouped per context as
        `sample_paths` returns them. G > 1: the G paths of a context share one decoder sequence
        (`grouped_logits`), so the memory is not repeated G times."""
        N, B = paths.size(0), memory.size(0)
        if N % B:
            raise ValueError(f"path_log_probs: {N} paths for {B} contexts; expected G paths per context (N = B * G).")
        decoder_input = torch.cat([torch.full_like(paths[:, :1], BOS), paths[:, :-1]], 1)
        if N == B:
            logits = self.next_token_logits(decoder_input, memory, padding)
        else:
            logits = self.grouped_logits(decoder_input.view(B, N // B, -1), memory, padding).flatten(0, 1)
        return self.masked_log_softmax(logits / temperature, masks).gather(2, paths.unsqueeze(-1)).squeeze(-1)

    def path_items(self, paths):
        """[N, M] vocab paths -> item ids (0 when the token set is no item's)."""
        posting = self.posting()
        hit = posting[paths].all(1)  # [N, n_items]
        return torch.where(hit.any(1), hit.float().argmax(1), torch.zeros(paths.size(0), dtype=torch.long, device=paths.device))

    # -- number of reasoning paths at evaluation (recbole_reason.depth_study) --------------------------------------
    reasoning_depth_key = "beam_size"

    def set_reasoning_depth(self, value):
        """Decode with `value` beams (reasoning paths) instead of the trained beam_size, without retraining; returns
        the previous width. It must stay >= the largest evaluated top-k, or Recall@K would be capped by the beam."""
        if isinstance(value, bool) or not isinstance(value, int) or value < max(1, self.max_topk):
            raise ValueError(
                f"beam_size (the number of reasoning paths) must be an integer >= the largest evaluated top-k "
                f"({self.max_topk}), got {value!r}."
            )
        previous, self.beam_size = self.beam_size, value
        return previous
