r"""R2ec
################################################
Reference:
    Runyang You, Yongqi Li, Xinyu Lin, Xin Zhang, Wenjie Wang, Wenjie Li, Liqiang Nie.
    "R²ec: Towards Large Recommender Models with Reasoning." NeurIPS 2025 (arXiv 2505.16994).
    Official code: github.com/YRYangang/RRec (commit 449a544); spec: ../shared/specs/r2ec.md.

One causal transformer, two heads that share it:
  * the **lm_head** (tied to the token embedding) writes a reasoning: `[THINK] r_1 .. r_T [ANS]`, stopping at
    `[ANS]` or forced to it after `r2ec_max_reason_len` tokens;
  * the **rec_head** has no parameters of its own: s(u, v) = cos(h_u, e_v) / tau, where h_u is the last-layer
    state at the user's `[ANS]` and e_v the state at the `[ANS]` of item v's own prompt
    `[ITEMP] <item-ID> <attribute tokens> [ANS]`, encoded by the **same** transformer.

The vocabulary is closed and built from the dataset: specials, one token per item, the item features' tokens
(`recbole_reason.data.item_features.item_attributes`), rating and time-gap buckets. Training: the supervised
warm-up (`calculate_loss`, our addition: no-reasoning rec loss + causal LM loss on the user prompts), then RecPO
(`recpo_loss`, driven by `R2ecTrainer`): K sampled reasoning trajectories per user, fused ranking reward,
group-normalised advantages **per trajectory**, clipped token surrogate on the reasoning tokens and an
advantage-weighted in-batch InfoNCE on the relabelled (best) trajectories. `r2ec_code_compat: true` reproduces
the official code's advantage broadcast (spec section 2.1), for comparison only.

Optional: `r2ec_backbone: hf` with `r2ec_hf_path` puts a local Hugging Face causal LM under the same heads and
losses (`transformers` is imported only then).
"""

import math
from dataclasses import dataclass
from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_reason.data.item_features import item_attributes, item_feature_fields, missing_item_features
from recbole_reason.model.rl import group_advantages

SPECIALS = ("[PAD]", "[BOS]", "[HIST]", "[SEP]", "[ITEMP]", "[THINK]", "[ANS]", "[UNK]")
PAD, BOS, HIST, SEP, ITEMP, THINK, ANS, UNK = range(len(SPECIALS))
TITLE_FIELDS = ("movie_title", "title")
REASON_TOKEN_KINDS = ("items", "attributes", "ratings", "gaps")


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary: one closed token space built from the dataset's own item features
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class R2ecVocabulary:
    size: int
    item_offset: int  # token of item i = item_offset + i; -1 when items have no ID token
    n_items: int
    attr_offset: int  # kept attribute k (0-based) has token attr_offset + k
    attr_global: torch.LongTensor  # [n_kept] global attribute id (item_features space) of each kept attribute
    rating_offset: int
    n_ratings: int
    gap_offset: int
    n_gaps: int
    attributes: object  # ItemAttributes or None (dataset without item features)

    def kind(self, token):
        if not 0 <= token < self.size:
            raise ValueError(
                f"R2ec token {token} is outside the vocabulary [0, {self.size}): it comes from a model or checkpoint "
                "built on another dataset or vocabulary settings (r2ec_vocab_max, r2ec_text_fields, ...)."
            )
        if token < len(SPECIALS):
            return "special"
        if self.item_offset >= 0 and self.item_offset <= token < self.item_offset + self.n_items:
            return "item"
        if self.attr_offset <= token < self.attr_offset + len(self.attr_global):
            return "attribute"
        if self.rating_offset <= token < self.rating_offset + self.n_ratings:
            return "rating"
        return "gap"


def _compact(tokens, pads_first):
    """Moves PAD tokens of each row to one side, keeping the order of the others (stable sort)."""
    key = (tokens != PAD).long() if pads_first else (tokens == PAD).long()
    order = torch.sort(key, dim=1, stable=True).indices
    return tokens.gather(1, order)


def build_vocabulary(dataset, text_fields, max_tokens_per_field, item_id_token, min_freq, vocab_max,
                     use_rating, n_gaps, rating_field):
    """The vocabulary and every item's attribute tokens [n_items, F * m] (vocabulary ids, 0-padded, field-major).
    Attribute values carried by fewer than `min_freq` items become [UNK]; the rarest are dropped to [UNK] too when
    the vocabulary would exceed `vocab_max`."""
    n_items = dataset.item_num
    fields = item_feature_fields(dataset) if text_fields == "auto" else list(text_fields)
    attributes = item_attributes(dataset, fields) if fields else None
    n_ratings = 0
    if use_rating and rating_field and rating_field in dataset.inter_feat:
        ratings = dataset.inter_feat[rating_field]
        low, high = float(ratings.min()), float(ratings.max())
        # Rating tokens are the rounded ratings 1..10. A 0-100 or 0-1 scale would silently collapse onto one or two
        # tokens; ratings of later splits outside the training range are clamped into it (user_prompt).
        if round(low) < 1 or round(high) > 10:
            raise ValueError(
                f"r2ec_use_rating_token: the ratings ({rating_field}) of dataset '{dataset.dataset_name}' span "
                f"[{low:g}, {high:g}], rating tokens are the rounded ratings 1..10. Fix: rescale the ratings to 1..10, "
                "or set r2ec_use_rating_token: false."
            )
        n_ratings = int(round(high))
    item_offset = len(SPECIALS) if item_id_token else -1
    attr_offset = len(SPECIALS) + (n_items if item_id_token else 0)

    if attributes is None:
        per_item = torch.zeros(n_items, 0, dtype=torch.long)
        attr_global = torch.zeros(0, dtype=torch.long)
    else:
        item_feat = dataset.get_item_feature()
        blocks, start = [], 0
        for field in attributes.fields:
            width = item_feat[field].shape[1] if item_feat[field].dim() == 2 else 1
            block = _compact(attributes.tokens[:, start:start + width], pads_first=False)[:, :max_tokens_per_field]
            blocks.append(F.pad(block, (0, max_tokens_per_field - block.shape[1])))
            start += width
        per_global = torch.stack(blocks, dim=1)  # [n_items, F, m] global attribute ids
        per_global[0] = 0  # the padding item carries no attributes
        # Document frequency: on how many items each attribute value occurs.
        doc_freq = torch.zeros(attributes.vocab_size, dtype=torch.long)
        for row in per_global.flatten(1):
            doc_freq[torch.unique(row[row > 0])] += 1
        budget = vocab_max - attr_offset - n_ratings - n_gaps
        if budget < 0:
            raise ValueError(
                f"r2ec_vocab_max must be >= {attr_offset + n_ratings + n_gaps} (specials + item tokens + ratings + "
                f"gaps) for this dataset, got {vocab_max}. Fix: raise r2ec_vocab_max or set r2ec_item_id_token: false."
            )
        candidates = torch.nonzero(doc_freq >= max(min_freq, 1)).squeeze(1)
        candidates = candidates[candidates > 0]
        if len(candidates) > budget:
            keep = torch.sort(doc_freq[candidates], descending=True, stable=True).indices[:budget]
            candidates = torch.sort(candidates[keep]).values
        attr_global = candidates
        global_to_token = torch.full((attributes.vocab_size,), UNK, dtype=torch.long)
        global_to_token[0] = PAD
        global_to_token[attr_global] = attr_offset + torch.arange(len(attr_global))
        per_item = global_to_token[per_global].flatten(1)
    rating_offset = attr_offset + len(attr_global)
    gap_offset = rating_offset + n_ratings
    vocab = R2ecVocabulary(
        size=gap_offset + n_gaps, item_offset=item_offset, n_items=n_items, attr_offset=attr_offset,
        attr_global=attr_global, rating_offset=rating_offset, n_ratings=n_ratings, gap_offset=gap_offset,
        n_gaps=n_gaps, attributes=attributes,
    )
    return vocab, per_item


# ---------------------------------------------------------------------------------------------------------------
# Backbone: small pre-LN causal transformer, learned positions, GELU, embedding tied to the LM head
# ---------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d, n_heads, inner, hidden_dropout, attn_dropout, eps):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(d, inner), nn.GELU(), nn.Linear(inner, d))
        self.drop = nn.Dropout(hidden_dropout)
        self.attn_dropout = attn_dropout

    def forward(self, x, mask, past=None):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, s, d)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, (k, v)


class TinyCausalLM(nn.Module):
    """`forward(tokens, valid, positions, past)` -> (last-layer states, cache). `valid` marks non-PAD keys; a
    PAD query attends only to itself so that no softmax row is empty."""

    def __init__(self, vocab_size, max_positions, d, n_layers, n_heads, inner, hidden_dropout, attn_dropout, eps,
                 init_range):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_positions, d)
        self.drop = nn.Dropout(hidden_dropout)
        self.blocks = nn.ModuleList(
            [_Block(d, n_heads, inner, hidden_dropout, attn_dropout, eps) for _ in range(n_layers)]
        )
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.max_positions = max_positions
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data.normal_(0.0, init_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()

    def lm_logits(self, hidden):
        return hidden @ self.tok_emb.weight.t()  # tied lm_head

    def forward(self, tokens, valid, positions, past=None):
        b, s = tokens.shape
        if past is None:
            key_valid = valid
            causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        else:
            key_valid = torch.cat([past["valid"], valid], dim=1)
            p = past["valid"].shape[1]
            causal = torch.ones(s, p + s, dtype=torch.bool, device=tokens.device).tril(diagonal=p)
        own = torch.zeros_like(causal)
        own[:, -s:] = torch.eye(s, dtype=torch.bool, device=tokens.device)
        mask = ((causal & key_valid[:, None, :]) | own).unsqueeze(1)  # [B, 1, s, keys]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions.clamp(max=self.max_positions - 1)))
        caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past is None else past["kv"][i])
            caches.append(kv)
        return self.ln_f(x), {"kv": caches, "valid": key_valid}


class HFCausalLM(nn.Module):
    """A local Hugging Face causal LM under R2ec's heads (spec 6.6). Its own tokenizer supplies the token ids of
    our closed vocabulary's rendered words (see `R2ec._hf_token_table`); `[ANS]` is an added token `<answer>`
    (the official code splits the string into sub-tokens: a deviation that keeps stopping a one-token test)."""

    def __init__(self, path):
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ValueError(
                "r2ec_backbone: hf needs the `transformers` package. Fix: pip install transformers, or use "
                "r2ec_backbone: tiny."
            ) from None
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["<answer>"]})
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        self.model.resize_token_embeddings(len(self.tokenizer))
        self.answer_id = self.tokenizer.convert_tokens_to_ids("<answer>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def lm_logits(self, hidden):
        return self.model.get_output_embeddings()(hidden)

    def forward(self, tokens, valid, positions, past=None):
        attention = valid.long() if past is None else torch.cat([past["valid"], valid], dim=1).long()
        out = self.model(
            input_ids=tokens, attention_mask=attention, position_ids=positions, output_hidden_states=True,
            past_key_values=None if past is None else past["kv"], use_cache=True,
        )
        return out.hidden_states[-1], {"kv": out.past_key_values, "valid": attention.bool()}


# ---------------------------------------------------------------------------------------------------------------
# RecPO math (spec section 2): reward, advantage, relabel mask, token and item losses
# ---------------------------------------------------------------------------------------------------------------
def fused_reward(scores, target, ndcg_k, softmax_weight):
    """Fused reward: r = (1 - w) * NDCG@k(rank of the target) + w * softmax(s)[target].
    `scores` [N, n_items] are the rec-head logits with history and padding already at -inf."""
    target_score = scores.gather(1, target[:, None])
    rank = 1 + (scores > target_score).sum(dim=1)
    ndcg = torch.where(rank <= ndcg_k, 1.0 / torch.log2(rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float))
    prob = torch.softmax(scores, dim=1).gather(1, target[:, None]).squeeze(1)
    return (1.0 - softmax_weight) * ndcg + softmax_weight * prob


def recpo_group_advantages(rewards, advantage_type):
    """Advantages within each user's group of K trajectories, one per trajectory; rewards [B, K] (`rl.group_advantages`).
    gaussian: (r - mean) / (unbiased std + 1e-8); leave-one-out: r * (1 + 1/K) - mean (as the official code)."""
    # float64: the rewards of one group often differ by ~1e-5, and a float32 mean would leave a group sum of
    # ~1e-3 after dividing by the std, hiding the zero-sum property the code_compat regression test relies on.
    if advantage_type == "gaussian":
        return group_advantages(rewards, "zscore", unbiased=True, eps=1e-8, dtype=torch.float64)
    return group_advantages(rewards, "leave-one-out", dtype=torch.float64)


def relabel_mask(advantages, topk):
    """1 for the top-`topk` trajectories of each group by advantage: only they feed the item loss."""
    mask = torch.zeros_like(advantages)
    return mask.scatter_(1, advantages.topk(min(topk, advantages.shape[1]), dim=1).indices, 1.0)


def _clipped_surrogate(logp, advantages, eps_low, eps_high):
    """DAPO clip: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - logp_old). Fully
    on-policy (one update per rollout, as the official code), so logp_old = logp.detach() and rho == 1."""
    ratio = torch.exp(logp - logp.detach())
    return -torch.min(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)


def recpo_token_loss(logp, mask, advantages, eps_low, eps_high, code_compat=False):
    """Clipped policy loss on the reasoning tokens. logp, mask [B, K, T]; advantages [B, K].
    Per-trajectory (ours, the paper's intent): A_i multiplies only trajectory i's tokens; token mean over the batch.
    code_compat: the official broadcast to (K, K, T) inside each one-group mini-batch, i.e. every trajectory's
    tokens are weighted by every A_i; averaged, that is the group-mean advantage, so the gradient vanishes."""
    mask = mask.float()
    if not code_compat:
        per_token = _clipped_surrogate(logp, advantages[..., None], eps_low, eps_high)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    per_token = _clipped_surrogate(logp[:, None, :, :], advantages[:, :, None, None], eps_low, eps_high)  # [B,K,K,T]
    per_pair = (per_token * mask[:, None]).sum(-1) / mask[:, None].sum(-1).clamp(min=1.0)
    return per_pair.mean()


def recpo_item_loss(logits, labels, advantages, relabel, eps_low, eps_high, code_compat=False):
    """Advantage-weighted in-batch InfoNCE (the clipped form of the official code on p = softmax(cos/tau)[label]).
    logits [B, K, C], labels [B, K], advantages and relabel [B, K]. Per-trajectory: weight A_i * mask_i, divided
    by the number of relabelled trajectories. code_compat: every trajectory gets the group mean of A * mask."""
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    weight = advantages * relabel
    if code_compat:
        weight = weight.mean(dim=1, keepdim=True).expand_as(weight)
        return _clipped_surrogate(logp, weight, eps_low, eps_high).mean()
    return _clipped_surrogate(logp, weight, eps_low, eps_high).sum() / relabel.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class R2ec(SequentialRecommender):
    r"""R²ec: a dual-head (reasoning + item scoring) causal transformer over a closed item/attribute vocabulary."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        logger = getLogger()
        self.hidden_size = config["hidden_size"]
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.layer_norm_eps = config["layer_norm_eps"] or 1e-12
        self.initializer_range = config["initializer_range"] or 0.02
        self.backbone_kind = config["r2ec_backbone"] or "tiny"
        self.hf_path = config["r2ec_hf_path"]
        text_fields = config["r2ec_text_fields"] if config["r2ec_text_fields"] is not None else "auto"
        self.max_tokens_per_field = config["r2ec_max_tokens_per_field"]
        self.hist_tokens_per_item = config["r2ec_hist_tokens_per_item"]
        self.item_id_token = bool(config["r2ec_item_id_token"])
        self.vocab_min_freq = config["r2ec_vocab_min_freq"]
        self.vocab_max = config["r2ec_vocab_max"]
        self.use_rating_token = bool(config["r2ec_use_rating_token"])
        self.n_gap_buckets = config["r2ec_time_gap_buckets"] or 0
        self.gap_to_target = bool(config["r2ec_time_gap_to_target"])
        self.max_reason_len = config["r2ec_max_reason_len"]
        self.reason_tokens = list(config["r2ec_reason_tokens"] or ["items", "attributes"])
        self.group_size = config["r2ec_group_size"]
        self.gen_temperature = config["r2ec_gen_temperature"]
        self.gen_top_k = config["r2ec_gen_top_k"]
        self.gen_top_p = config["r2ec_gen_top_p"]
        self.eval_temperature = config["r2ec_eval_temperature"] or 0.0
        self.sim_temperature = config["r2ec_sim_temperature"]
        self.reward_ndcg_k = config["r2ec_reward_ndcg_k"]
        self.reward_softmax_weight = config["r2ec_reward_softmax_weight"]
        self.advantage_type = config["r2ec_advantage_type"]
        self.relabel_topk = config["r2ec_relabel_topk"]
        self.eps_low = config["r2ec_eps_low"]
        self.eps_high = config["r2ec_eps_high"]
        self.num_negatives = config["r2ec_num_negatives"] or 0
        self.item_refresh_steps = config["r2ec_item_refresh_steps"]
        self.item_batch_size = config["r2ec_item_batch_size"] or 1024
        self.warmup_reasoning = config["r2ec_warmup_reasoning"] or "empty"
        self.warmup_candidates = config["r2ec_warmup_candidates"] or "in_batch"
        self.lm_loss_weight = config["r2ec_lm_loss_weight"]
        self.lm_positions = config["r2ec_lm_positions"]
        self.token_loss_weight = config["r2ec_token_loss_weight"]
        self.item_loss_weight = config["r2ec_item_loss_weight"]
        self.code_compat = bool(config["r2ec_code_compat"])
        self._validate()
        self.rating_list_field = (config["RATING_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_list_field = (config["TIME_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_field = config["TIME_FIELD"]

        self.vocab, item_attr_tokens = build_vocabulary(
            dataset, text_fields, self.max_tokens_per_field, self.item_id_token, self.vocab_min_freq, self.vocab_max,
            self.use_rating_token, self.n_gap_buckets, config["RATING_FIELD"],
        )
        if self.vocab.attributes is None:
            if not self.item_id_token:
                raise ValueError(
                    f"Dataset '{dataset.dataset_name}' has no item features and r2ec_item_id_token is false: items "
                    "would have no tokens at all. Fix: set r2ec_item_id_token: true or load item features."
                )
            logger.info(
                f"R2ec: dataset '{dataset.dataset_name}' has no token/token_seq item features "
                f"({missing_item_features(dataset) or 'r2ec_text_fields names none'}); items are described by their "
                "ID token alone."
            )
        else:
            logger.info(
                f"R2ec vocabulary: {self.vocab.size} tokens ({len(SPECIALS)} specials, "
                f"{self.n_items if self.item_id_token else 0} item IDs, {len(self.vocab.attr_global)} attribute values "
                f"from {self.vocab.attributes.fields}, {self.vocab.n_ratings} ratings, {self.vocab.n_gaps} time gaps)"
            )
        if self.n_gap_buckets:
            times = dataset.inter_feat[self.time_field].float()
            self.max_gap = float(times.max() - times.min()) or 1.0

        # Item prompts `[ITEMP] <item-ID> <attrs> [ANS]`, right-padded; [ANS] right after the last real token.
        ids = (self.vocab.item_offset + torch.arange(self.n_items))[:, None] if self.item_id_token else None
        parts = [torch.full((self.n_items, 1), ITEMP)] + ([ids] if ids is not None else []) + [item_attr_tokens]
        body = _compact(torch.cat(parts, dim=1), pads_first=False)
        ans_pos = (body != PAD).sum(dim=1)
        item_prompt = torch.cat([body, torch.zeros(self.n_items, 1, dtype=torch.long)], dim=1)
        item_prompt[torch.arange(self.n_items), ans_pos] = ANS
        self.register_buffer("item_prompt", item_prompt, persistent=False)
        self.register_buffer("item_ans_pos", ans_pos, persistent=False)
        # History slots use the first attribute of each field, then the second, ...: a title word, the year and a
        # genre rather than three title words.
        n_fields = item_attr_tokens.shape[1] // self.max_tokens_per_field
        round_robin = item_attr_tokens.view(self.n_items, n_fields, self.max_tokens_per_field).transpose(1, 2)
        hist_attr = _compact(round_robin.flatten(1), pads_first=False)[:, : self.hist_tokens_per_item]
        self.register_buffer("hist_attr", hist_attr, persistent=False)
        self.hist_attr_width = self.hist_attr.shape[1]

        allowed = torch.zeros(self.vocab.size, dtype=torch.bool)
        allowed[ANS] = True
        v = self.vocab
        if "items" in self.reason_tokens and self.item_id_token:
            allowed[v.item_offset + 1: v.item_offset + v.n_items] = True
        if "attributes" in self.reason_tokens:
            allowed[v.attr_offset: v.attr_offset + len(v.attr_global)] = True
        if "ratings" in self.reason_tokens:
            allowed[v.rating_offset: v.rating_offset + v.n_ratings] = True
        if "gaps" in self.reason_tokens:
            allowed[v.gap_offset: v.gap_offset + v.n_gaps] = True
        self.register_buffer("reason_allowed", allowed, persistent=False)

        slot = 1 + int(self.item_id_token) + self.hist_attr_width + int(v.n_ratings > 0) + int(v.n_gaps > 0)
        self.max_prompt_len = 3 + self.max_seq_length * slot
        max_positions = max(self.max_prompt_len, item_prompt.shape[1]) + self.max_reason_len + 2
        if self.backbone_kind == "hf":
            self.backbone = HFCausalLM(self.hf_path)
            self.register_buffer("hf_token_table", self._hf_token_table(dataset), persistent=False)
            self.hidden_size = self.backbone.model.config.hidden_size
        else:
            self.backbone = TinyCausalLM(
                v.size, max_positions, self.hidden_size, self.n_layers, self.n_heads, self.inner_size,
                self.hidden_dropout_prob, self.attn_dropout_prob, self.layer_norm_eps, self.initializer_range,
            )
        # No-grad item table (rec_head "H_V"): refreshed at each evaluation and every r2ec_item_refresh_steps.
        self.register_buffer("item_table", torch.zeros(self.n_items, self.hidden_size), persistent=False)
        self._table_dirty = True
        self._warmup_steps = 0

    def _validate(self):
        def need(ok, key, value, fix):
            if not ok:
                raise ValueError(f"{key} {fix}, got {value!r}.")

        need(self.backbone_kind in ("tiny", "hf"), "r2ec_backbone", self.backbone_kind, "must be 'tiny' or 'hf'")
        need(self.backbone_kind != "hf" or bool(self.hf_path), "r2ec_hf_path", self.hf_path,
             "must name a local model directory when r2ec_backbone is 'hf'")
        need(self.hidden_size % self.n_heads == 0, "hidden_size", self.hidden_size,
             f"must be divisible by n_heads={self.n_heads}")
        need(self.max_reason_len >= 1, "r2ec_max_reason_len", self.max_reason_len,
             "must be >= 1 (the reasoning budget in tokens; the paper's 'no reasoning' variant is the warm-up)")
        need(self.group_size >= 2, "r2ec_group_size", self.group_size,
             "must be >= 2 (RecPO normalises advantages within a group of K rollouts)")
        need(self.max_tokens_per_field >= 1, "r2ec_max_tokens_per_field", self.max_tokens_per_field, "must be >= 1")
        need(self.hist_tokens_per_item >= 0, "r2ec_hist_tokens_per_item", self.hist_tokens_per_item, "must be >= 0")
        need(self.vocab_min_freq >= 1, "r2ec_vocab_min_freq", self.vocab_min_freq, "must be >= 1")
        need(self.n_gap_buckets >= 0, "r2ec_time_gap_buckets", self.n_gap_buckets, "must be >= 0 (0 = off)")
        need(set(self.reason_tokens) <= set(REASON_TOKEN_KINDS) and self.reason_tokens, "r2ec_reason_tokens",
             self.reason_tokens, f"must be a non-empty subset of {list(REASON_TOKEN_KINDS)}")
        need(self.gen_temperature > 0, "r2ec_gen_temperature", self.gen_temperature, "must be > 0")
        need(self.gen_top_k >= 0, "r2ec_gen_top_k", self.gen_top_k, "must be >= 0 (0 = no top-k filter)")
        need(0 < self.gen_top_p <= 1, "r2ec_gen_top_p", self.gen_top_p, "must be in (0, 1]")
        need(self.eval_temperature >= 0, "r2ec_eval_temperature", self.eval_temperature, "must be >= 0 (0 = greedy)")
        need(self.sim_temperature > 0, "r2ec_sim_temperature", self.sim_temperature, "must be > 0")
        need(self.reward_ndcg_k >= 1, "r2ec_reward_ndcg_k", self.reward_ndcg_k, "must be >= 1")
        need(0 <= self.reward_softmax_weight <= 1, "r2ec_reward_softmax_weight", self.reward_softmax_weight,
             "must be in [0, 1]")
        need(self.advantage_type in ("gaussian", "leave-one-out"), "r2ec_advantage_type", self.advantage_type,
             "must be 'gaussian' or 'leave-one-out'")
        need(1 <= self.relabel_topk <= self.group_size, "r2ec_relabel_topk", self.relabel_topk,
             f"must be in [1, r2ec_group_size={self.group_size}]")
        need(0 <= self.eps_low < 1, "r2ec_eps_low", self.eps_low, "must be in [0, 1)")
        need(self.eps_high >= 0, "r2ec_eps_high", self.eps_high, "must be >= 0")
        need(self.num_negatives >= 0, "r2ec_num_negatives", self.num_negatives, "must be >= 0")
        need(self.item_refresh_steps >= 1, "r2ec_item_refresh_steps", self.item_refresh_steps, "must be >= 1")
        need(self.warmup_reasoning in ("empty", "greedy", "sampled"), "r2ec_warmup_reasoning",
             self.warmup_reasoning, "must be 'empty', 'greedy' or 'sampled'")
        need(self.warmup_candidates in ("in_batch", "catalogue"), "r2ec_warmup_candidates", self.warmup_candidates,
             "must be 'in_batch' or 'catalogue'")
        need(self.lm_loss_weight >= 0, "r2ec_lm_loss_weight", self.lm_loss_weight, "must be >= 0")
        need(self.lm_positions >= 1, "r2ec_lm_positions", self.lm_positions, "must be >= 1")

    # -- cache bookkeeping ------------------------------------------------------------------------------------------
    def train(self, mode=True):
        # Every switch (RecBole calls eval() before each evaluation) invalidates the no-grad item table.
        self._table_dirty = True
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self._table_dirty = True
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def set_dropout(self, p):
        """RecPO runs with dropout off so that sampling and update see the same policy (official code)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, _Block):
                module.attn_dropout = p

    # -- prompts ----------------------------------------------------------------------------------------------------
    def _hf_token_table(self, dataset):
        """[vocab, 4] HF token ids spelling each closed-vocabulary token as words (hf backbone only)."""
        tok = self.backbone.tokenizer
        table = torch.full((self.vocab.size, 4), -1, dtype=torch.long)
        for token in range(1, self.vocab.size):  # [PAD] stays all -1: no HF token at all
            ids = (
                [self.backbone.answer_id] if token == ANS
                else tok.encode(" " + render_token(self.vocab, dataset, token), add_special_tokens=False)[:4]
            )
            table[token, : len(ids)] = torch.tensor(ids)
        return table

    def user_prompt(self, interaction):
        """`[BOS] [HIST] (<item-ID> <attrs> <rating>? <gap>? [SEP])*L [THINK]`, left-padded: every row ends in
        [THINK] at the last column, so generated tokens are appended at one column for the whole batch."""
        items = interaction[self.ITEM_SEQ]
        lengths = interaction[self.ITEM_SEQ_LEN]
        b, length = items.shape
        real = torch.arange(length, device=items.device)[None, :] < lengths[:, None]
        parts = []
        if self.item_id_token:
            parts.append((self.vocab.item_offset + items)[..., None])
        parts.append(self.hist_attr[items])
        if self.vocab.n_ratings:
            ratings = interaction[self.rating_list_field].round().long().clamp(1, self.vocab.n_ratings)
            parts.append((self.vocab.rating_offset + ratings - 1)[..., None])
        if self.vocab.n_gaps:
            times = interaction[self.time_list_field].float()
            last = times.gather(1, (lengths - 1).clamp(min=0)[:, None])
            # Leak-free default: gap to the last history item; the paper measures it to the target's time.
            ref = interaction[self.time_field].float()[:, None] if self.gap_to_target else last
            gap = (ref - times).clamp(min=0)
            bucket = (torch.log1p(gap) / math.log1p(self.max_gap) * self.vocab.n_gaps).long()
            parts.append((self.vocab.gap_offset + bucket.clamp(0, self.vocab.n_gaps - 1))[..., None])
        parts.append(torch.full((b, length, 1), SEP, device=items.device))
        slots = torch.cat(parts, dim=2) * real[..., None]
        head = torch.tensor([BOS, HIST], device=items.device).expand(b, 2)
        tokens = torch.cat([head, slots.flatten(1), torch.full((b, 1), THINK, device=items.device)], dim=1)
        tokens = _compact(tokens, pads_first=True)
        keep = int((tokens != PAD).sum(dim=1).max())
        return tokens[:, -keep:]

    def _backbone_length(self, tokens):
        """Backbone tokens per row (an HF backbone spells one closed token with several sub-tokens)."""
        if self.backbone_kind == "hf":
            return (self.hf_token_table[tokens] >= 0).sum(dim=(1, 2))
        return (tokens != PAD).sum(dim=1)

    @staticmethod
    def _positions(valid):
        return (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def _run(self, tokens, past=None, start=None):
        """Backbone over closed-vocabulary tokens; returns states aligned to the input columns."""
        if self.backbone_kind == "hf":
            return self._run_hf(tokens, past, start)
        valid = tokens != PAD
        positions = self._positions(valid) if past is None else start[:, None] + self._positions(valid)
        return self.backbone(tokens, valid, positions, past)

    def _run_hf(self, tokens, past, start):
        # Each closed token is spelled by up to 4 HF tokens; the state of its last sub-token stands for it.
        spelled = self.hf_token_table[tokens].flatten(1)
        valid = spelled >= 0
        spelled = spelled.clamp(min=0)
        positions = self._positions(valid) if past is None else start[:, None] + self._positions(valid)
        hidden, cache = self.backbone(spelled, valid, positions, past)
        last_sub = (self.hf_token_table[tokens] >= 0).sum(-1).clamp(min=1) - 1
        index = torch.arange(tokens.shape[1], device=tokens.device)[None, :] * 4 + last_sub
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), cache

    def lm_logits(self, hidden):
        logits = self.backbone.lm_logits(hidden)
        if self.backbone_kind == "hf":
            # Closed-vocabulary logit = the logit of the token's first HF sub-token.
            first = self.hf_token_table[:, 0].clamp(min=0)
            logits = logits[..., first]
        return logits

    # -- the two heads ------------------------------------------------------------------------------------------------
    def encode_items(self, item_ids):
        """e_v: L2-normalised state at [ANS] of each item's own prompt (same transformer as the users)."""
        tokens = self.item_prompt[item_ids]
        hidden, _ = self._run(tokens)
        state = hidden[torch.arange(len(item_ids), device=tokens.device), self.item_ans_pos[item_ids]]
        return F.normalize(state, dim=-1)

    @torch.no_grad()
    def refresh_item_table(self):
        """Re-encodes every item without dropout (the table stands in for the model's deterministic encodings)."""
        was_training = self.backbone.training
        self.backbone.eval()
        ids = torch.arange(self.n_items, device=self.item_prompt.device)
        self.item_table.copy_(torch.cat([self.encode_items(chunk) for chunk in ids.split(self.item_batch_size)]))
        self.backbone.train(was_training)
        self._table_dirty = False

    def rec_head(self, user_states, item_states):
        """s(u, v) = cos(h_u, e_v) / tau."""
        return F.normalize(user_states, dim=-1) @ item_states.t() / self.sim_temperature

    def _reason_logits(self, hidden):
        logits = self.lm_logits(hidden)
        return logits.masked_fill(~self.reason_allowed, float("-inf"))

    def _pick(self, logits, temperature, top_k, top_p):
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        # Gumbel-max: an exact categorical sample, much cheaper than torch.multinomial on CPU.
        uniform = torch.rand_like(logits).clamp(min=1e-20)
        gumbel = -torch.log((-torch.log(uniform)).clamp(min=1e-20))
        return (logits + gumbel).argmax(dim=-1)

    def _shares_prompts(self):
        """Whether K rollouts of one prompt may share one prompt forward (its keys/values repeated K times): exact
        when no dropout is active (RecPO runs without) and the backbone is ours (an HF cache is not repeated)."""
        if self.backbone_kind != "tiny":
            return False
        if not self.training:
            return True
        return not any(
            (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(m, _Block) and m.attn_dropout > 0)
            for m in self.backbone.modules()
        )

    @staticmethod
    def _repeat_cache(past, k):
        """A tiny backbone's cache with every row repeated k times (rows grouped per prompt, as repeat_interleave)."""
        return {"kv": [(key.repeat_interleave(k, 0), value.repeat_interleave(k, 0)) for key, value in past["kv"]],
                "valid": past["valid"].repeat_interleave(k, 0)}

    @torch.no_grad()
    def generate_reasoning(self, prompt, temperature=0.0, top_k=0, top_p=1.0, max_len=None, group_size=1):
        """LM head, autoregressive with a KV cache: stop at [ANS], or append [ANS] after `max_len` tokens.
        `group_size` K: K reasonings per prompt row, rows grouped per prompt (the same as decoding
        prompt.repeat_interleave(K)); the prompt is run once, its cache repeated K times, when `_shares_prompts`.
        Returns (reasoning [N, <= max_len + 1] closed tokens PAD after [ANS], sampled mask (the forced [ANS] is
        not the policy's action), state at [ANS] [N, d]), N = K * prompt rows."""
        max_len = self.max_reason_len if max_len is None else max_len
        if group_size > 1 and not self._shares_prompts():
            prompt, group_size = prompt.repeat_interleave(group_size, dim=0), 1
        hidden, past = self._run(prompt)
        last = hidden[:, -1]
        position = self._backbone_length(prompt)  # next position id: backbone tokens so far
        if group_size > 1:
            last, position = last.repeat_interleave(group_size, 0), position.repeat_interleave(group_size, 0)
            past = self._repeat_cache(past, group_size)
        n = last.shape[0]
        finished = torch.zeros(n, dtype=torch.bool, device=prompt.device)
        ans_state = torch.zeros_like(last)
        steps, sampled = [], []
        for t in range(max_len + 1):
            if t < max_len:
                token = self._pick(self._reason_logits(last), temperature, top_k, top_p)
                sampled.append(~finished)
            else:
                token = torch.full_like(finished, ANS, dtype=torch.long)
                sampled.append(torch.zeros_like(finished))
            token = token.masked_fill(finished, PAD)
            steps.append(token)
            hidden, past = self._run(token[:, None], past, position)
            position = position + self._backbone_length(token[:, None])
            last = hidden[:, -1]
            now = token == ANS
            ans_state[now] = last[now]
            finished |= now
            if bool(finished.all()):
                break
        return torch.stack(steps, dim=1), torch.stack(sampled, dim=1), ans_state

    def forward_with_reasoning(self, prompt, reasoning, group_size=1):
        """One forward (with grad) over prompt + reasoning: states at [ANS] (h_u) and the log-probabilities the LM
        head gives each reasoning token (reasoning-vocabulary softmax, as sampled), and all states.
        `group_size` K: reasoning has K rows per prompt row (grouped per prompt). When `_shares_prompts`, the prompt
        is run once and its keys/values repeated K times (the gradient reaches the prompt through all K): the same
        numbers as K copies of the prompt for K times less prompt compute; the states are then not returned (None)."""
        if group_size > 1 and self._shares_prompts():
            prompt_hidden, past = self._run(prompt)
            start = self._backbone_length(prompt).repeat_interleave(group_size, 0)
            reason_hidden, _ = self._run(reasoning, self._repeat_cache(past, group_size), start)
            states = torch.cat([prompt_hidden[:, -1:].repeat_interleave(group_size, 0), reason_hidden], dim=1)
            hidden = None
        else:
            hidden, _ = self._run(torch.cat([prompt.repeat_interleave(group_size, 0), reasoning], dim=1))
            states = hidden[:, prompt.shape[1] - 1:]  # the [THINK] column, then the reasoning columns
        ans_col = 1 + (reasoning == ANS).long().argmax(dim=1)
        h_u = states[torch.arange(len(reasoning), device=reasoning.device), ans_col]
        logits = self._reason_logits(states[:, :-1])  # each reasoning token predicted from the column before it
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, reasoning[..., None]).squeeze(-1)
        token_logp = token_logp.masked_fill(reasoning == PAD, 0.0)
        return h_u, token_logp, hidden

    def _user_reasoning(self, prompt, mode):
        if mode == "empty":  # the paper's "no reasoning" variant: [THINK][ANS]
            return torch.full((prompt.shape[0], 1), ANS, dtype=torch.long, device=prompt.device)
        if mode == "greedy":
            return self.generate_reasoning(prompt, 0.0)[0]
        return self.generate_reasoning(prompt, self.gen_temperature, self.gen_top_k, self.gen_top_p)[0]

    def _candidates(self, targets):
        """In-batch targets (+ random negatives), unique, and the label of each user among them."""
        pool = targets
        if self.num_negatives:
            pool = torch.cat([targets, torch.randint(1, self.n_items, (self.num_negatives,), device=targets.device)])
        candidates, inverse = torch.unique(pool, return_inverse=True)
        return candidates, inverse[: len(targets)]

    def _history_mask(self, interaction, rows):
        """[rows, n_items] True at each user's history items (not its target) and at the padding item."""
        items = interaction[self.ITEM_SEQ]
        mask = torch.zeros(items.shape[0], self.n_items, dtype=torch.bool, device=items.device)
        mask.scatter_(1, items, True)
        mask[torch.arange(len(items)), interaction[self.POS_ITEM_ID]] = False
        mask[:, 0] = True
        return mask.repeat_interleave(rows // len(items), dim=0)

    # -- stage A: supervised warm-up ------------------------------------------------------------------------------
    def language_model_loss(self, prompt, hidden):
        """Causal LM loss on the user prompts (`hidden`: states of a forward whose first columns are `prompt`), on
        at most `r2ec_lm_positions` random next-token positions (the full [B, S, V] logits do not fit a CPU batch)."""
        target = prompt[:, 1:]
        rows, cols = torch.nonzero((target != PAD) & (prompt[:, :-1] != PAD), as_tuple=True)
        if len(rows) > self.lm_positions:
            pick = torch.randperm(len(rows), device=prompt.device)[: self.lm_positions]
            rows, cols = rows[pick], cols[pick]
        logits = self.lm_logits(hidden[rows, cols])
        return F.cross_entropy(logits, target[rows, cols])

    def calculate_loss(self, interaction):
        targets = interaction[self.POS_ITEM_ID]
        prompt = self.user_prompt(interaction)
        reasoning = self._user_reasoning(prompt, self.warmup_reasoning)
        h_u, _, hidden = self.forward_with_reasoning(prompt, reasoning)
        candidates, labels = self._candidates(targets)
        cand_states = self.encode_items(candidates)
        if self.warmup_candidates == "catalogue":
            # Softmax over the whole catalogue: fresh (with grad) rows for the in-batch candidates, the no-grad table
            # (re-encoded every r2ec_item_refresh_steps) for all other items, as SASRec's full CE but affordable.
            if self._warmup_steps % self.item_refresh_steps == 0:
                self.refresh_item_table()
            table = self.item_table.detach().index_copy(0, candidates, cand_states)
            rec_loss = F.cross_entropy(self.rec_head(h_u, table[1:]), targets - 1)
        else:
            rec_loss = F.cross_entropy(self.rec_head(h_u, cand_states), labels)
        self._warmup_steps += 1
        self._table_dirty = True
        if self.lm_loss_weight == 0:
            return rec_loss
        return rec_loss, self.lm_loss_weight * self.language_model_loss(prompt, hidden)

    # -- stage B: RecPO ---------------------------------------------------------------------------------------------
    def recpo_loss(self, interaction):
        """One RecPO step (spec section 2): returns (token loss, item loss) and scalars to log."""
        targets = interaction[self.POS_ITEM_ID]
        b, k = len(targets), self.group_size
        prompt = self.user_prompt(interaction)  # K rollouts per user share one prompt forward (`_shares_prompts`)
        reasoning, sampled, _ = self.generate_reasoning(
            prompt, self.gen_temperature, self.gen_top_k, self.gen_top_p, group_size=k
        )
        h_u, token_logp, _ = self.forward_with_reasoning(prompt, reasoning, group_size=k)
        with torch.no_grad():
            scores = self.rec_head(h_u.detach(), self.item_table).masked_fill(
                self._history_mask(interaction, b * k), float("-inf")
            )
            rewards = fused_reward(
                scores, targets.repeat_interleave(k), min(self.reward_ndcg_k, self.n_items),
                self.reward_softmax_weight,
            ).view(b, k)
            advantages = recpo_group_advantages(rewards, self.advantage_type)
            relabel = relabel_mask(advantages, self.relabel_topk)
        token_loss = recpo_token_loss(
            token_logp.view(b, k, -1), sampled.view(b, k, -1), advantages, self.eps_low, self.eps_high,
            self.code_compat,
        )
        candidates, labels = self._candidates(targets)
        cand_states = self.encode_items(candidates)
        with torch.no_grad():  # in-batch target rows of the cache overwritten with their fresh encodings
            self.item_table[candidates] = cand_states.detach()
        logits = self.rec_head(h_u, cand_states).view(b, k, -1)
        item_loss = recpo_item_loss(
            logits, labels[:, None].expand(b, k), advantages, relabel, self.eps_low, self.eps_high, self.code_compat
        )
        stats = {
            "reward": rewards.mean().item(),
            "advantage_abs_mean": advantages.abs().mean().item(),  # NaN / inf here stops RecPO, naming it
            "reward_best": rewards.max(dim=1).values.mean().item(),
            "reasoning_len": sampled.float().sum(dim=1).mean().item(),
            "stopped_at_ans": ((reasoning == ANS) & sampled).any(dim=1).float().mean().item(),
        }
        return (self.token_loss_weight * token_loss, self.item_loss_weight * item_loss), stats

    # -- inference ----------------------------------------------------------------------------------------------------
    def _user_scores(self, interaction):
        if self._table_dirty:
            self.refresh_item_table()
        prompt = self.user_prompt(interaction)
        _, _, h_u = self.generate_reasoning(prompt, self.eval_temperature, self.gen_top_k, self.gen_top_p)
        return self.rec_head(h_u, self.item_table)

    def full_sort_predict(self, interaction):
        return self._user_scores(interaction)

    def predict(self, interaction):
        scores = self._user_scores(interaction)
        return scores.gather(1, interaction[self.ITEM_ID][:, None]).squeeze(1)

    # -- seeing the reasoning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, dataset, user_ids, topk=5):
        """The reasoning R2ec generates for users, rendered as words and item titles.

        dataset: a RecBole SequentialDataset holding the users' sequences (e.g. `test_data.dataset`, or the dataset
        from `create_dataset`); user_ids: external user tokens (str) or internal ids (int). For each user, the
        row with the longest history is used (the most recent prefix). Returns one dict per user:
        {'user', 'history': [titles], 'reasoning': [words], 'top_items': [titles], 'target': title}."""
        was_training = self.training
        self.eval()
        uid_field = dataset.uid_field
        inter = dataset.inter_feat
        out = []
        for user in user_ids:
            uid = dataset.token2id(uid_field, str(user)) if isinstance(user, str) else int(user)
            rows = torch.nonzero(inter[uid_field] == uid).squeeze(1)
            if len(rows) == 0:
                raise ValueError(f"explain: user {user!r} has no sequence in this dataset.")
            row = rows[inter[self.ITEM_SEQ_LEN][rows].argmax()]
            batch = inter[row: row + 1].to(self.item_prompt.device)
            if self._table_dirty:
                self.refresh_item_table()
            prompt = self.user_prompt(batch)
            reasoning, sampled, h_u = self.generate_reasoning(prompt, self.eval_temperature, self.gen_top_k,
                                                              self.gen_top_p)
            scores = self.rec_head(h_u, self.item_table)
            scores.masked_fill_(self._history_mask(batch, 1), float("-inf"))
            history = batch[self.ITEM_SEQ][0, : int(batch[self.ITEM_SEQ_LEN][0])].tolist()
            out.append({
                "user": str(dataset.id2token(uid_field, uid)),
                "history": [item_title(dataset, i) for i in history],
                "reasoning": [render_token(self.vocab, dataset, int(t)) for t in reasoning[0] if int(t) != PAD],
                "top_items": [item_title(dataset, int(i)) for i in scores[0].topk(topk).indices],
                "target": item_title(dataset, int(batch[self.POS_ITEM_ID][0])),
            })
        self.train(was_training)
        return out

    # -- reasoning length at evaluation (recbole_reason.depth_study) -------------------------------------------------
    reasoning_depth_key = "r2ec_max_reason_len"

    def set_reasoning_depth(self, value):
        """Generate at most `value` reasoning tokens before [ANS] at evaluation, without retraining; returns the
        previous budget. 0 answers right after [THINK] (no reasoning). The tiny backbone's position table is sized
        for the trained budget: a longer one would reuse its last position, so it is refused."""
        limit = None
        if isinstance(self.backbone, TinyCausalLM):
            limit = self.backbone.max_positions - max(self.max_prompt_len, self.item_prompt.shape[1]) - 2
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit is not None and value > limit):
            raise ValueError(
                f"r2ec_max_reason_len (the reasoning length) must be an integer in [0, {limit}] for this model (its "
                f"position table holds {limit} reasoning tokens), got {value!r}."
                if limit is not None else f"r2ec_max_reason_len (the reasoning length) must be an integer >= 0, got {value!r}."
            )
        previous, self.max_reason_len = self.max_reason_len, value
        return previous


def item_title(dataset, item):
    """An item's title from its title field (ml-100k `movie_title`, Amazon `title`), else its external id."""
    feat = dataset.get_item_feature()
    for field in TITLE_FIELDS:
        if field in feat:
            words = feat[field][item]
            words = words[words > 0].tolist() if words.dim() else [int(words)]
            if words:
                return " ".join(str(dataset.id2token(field, w)) for w in words)
    return f"item {dataset.id2token(dataset.iid_field, item)}"


def render_token(vocab, dataset, token):
    """One closed-vocabulary token in words: '[ANS]', 'item:Toy Story', 'class:Comedy', 'rating:4', 'gap:2'."""
    kind = vocab.kind(token)
    if kind == "special":
        return SPECIALS[token]
    if kind == "item":
        return f"item:{item_title(dataset, token - vocab.item_offset)}"
    if kind == "attribute":
        return vocab.attributes.describe(dataset, int(vocab.attr_global[token - vocab.attr_offset]))
    if kind == "rating":
        return f"rating:{token - vocab.rating_offset + 1}"
    return f"gap:{token - vocab.gap_offset}"
