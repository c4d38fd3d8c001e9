"""R2ec's language model behind one small protocol, and its first implementation: the tiny causal transformer.

R2ec (`model/sequential_recommender/r2ec.py`) never touches tokens. It asks its backbone for prompts, reasoning
and the hidden states at the answer marker, and keeps only the two heads' maths (cos/tau item scores, the warm-up
softmax, RecPO). A backbone is an `nn.Module` with:

    hidden_size                                  width d of the states it returns
    answer_id, pad_id                            token ids of the answer marker and of padding in reasoning rows
    user_prompts(interaction) -> prompt          the users' prompts, one row per interaction (an opaque batch: R2ec
                                                 only passes it back, or repeats it with `repeat_prompts`)
    repeat_prompts(prompt, k) -> prompt          every row k times, grouped per row (as repeat_interleave)
    item_prompts(item_ids) -> prompt             the items' own prompts
    item_states(item_ids) -> [n, d]              states at the answer marker of the item prompts (with grad)
    generate(prompt, max_len, temperature, top_k, top_p, group_size) -> Reasoning
                                                 `group_size` reasonings per prompt row (rows grouped per prompt),
                                                 KV-cached, each stopping at the answer marker or forced to it after
                                                 `max_len` tokens; temperature 0 = greedy. No gradient.
    answer_states(prompt, reasoning_tokens, group_size) -> (h [N, d], token_logp [N, T])
                                                 one forward with grad over prompt + reasoning: the state at the
                                                 answer marker and the log-probability of each reasoning token under
                                                 the distribution `generate` samples from (0 at padding)
    warmup_states(prompt, target_items, mode, max_len) -> (h [B, d], lm_loss)
                                                 the warm-up's forward: states at the answer marker after an
                                                 'empty' ([THINK][ANS]), 'greedy' or 'sampled' reasoning, and the
                                                 backbone's language-model loss on the format it is evaluated in
    shares_prompts() -> bool                     whether K rollouts of a prompt may share one prompt forward
    constant_reasoning(like) / random_reasoning(like, generator) -> Reasoning
                                                 the same lengths as `like`, its content replaced by one fixed token
                                                 or uniform random tokens (the reasoning-content control)
    render(tokens, dataset) -> [str]             one reasoning row in words
    set_dropout(p); max_reasoning_len            RecPO runs without dropout; the longest reasoning it can hold
                                                 (None: no limit)
    describe() -> str                            one log line about the model and its vocabulary

Implementations: `TinyBackbone` here (`r2ec_backbone: tiny`, closed vocabulary of `data/r2ec_vocab.py`), and
`recbole_reason.model.r2ec_llm.HFBackbone` (`r2ec_backbone: hf`, a Hugging Face causal LM with LoRA).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_reason.data.item_features import missing_item_features
from recbole_reason.data.r2ec_vocab import (
    ANS, PAD, SPECIALS, build_vocabulary, compact, gap_buckets, history_attributes, item_prompt_tokens,
    reasoning_token_mask, render_token, user_prompt_tokens,
)

RATIONALES = ("none", "target_attrs")


@dataclass
class Reasoning:
    tokens: torch.LongTensor  # [N, T] backbone token ids; the answer marker ends each row, PAD after it
    sampled: torch.BoolTensor  # [N, T] tokens the policy chose (a forced answer marker is not an action)
    answer_states: torch.Tensor = None  # [N, d] state at the answer marker, when generation computed it


def sample_next_token(logits, temperature, top_k, top_p):
    """Greedy (temperature 0) or a sample after temperature, top-k and nucleus filtering. Gumbel-max: an exact
    categorical sample, much cheaper than torch.multinomial on CPU."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    uniform = torch.rand_like(logits).clamp(min=1e-20)
    gumbel = -torch.log((-torch.log(uniform)).clamp(min=1e-20))
    return (logits + gumbel).argmax(dim=-1)


def answer_columns(tokens, answer_id):
    """Column of each row's (first) answer marker."""
    return (tokens == answer_id).long().argmax(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The tiny causal LM: pre-LN transformer, learned positions, GELU, embedding tied to the LM head
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


def _repeat_cache(past, k):
    """A cache with every row repeated k times (rows grouped per prompt, as repeat_interleave)."""
    return {"kv": [(key.repeat_interleave(k, 0), value.repeat_interleave(k, 0)) for key, value in past["kv"]],
            "valid": past["valid"].repeat_interleave(k, 0)}


def _detach_cache(past):
    return {"kv": [(key.detach(), value.detach()) for key, value in past["kv"]], "valid": past["valid"]}


# ---------------------------------------------------------------------------------------------------------------
# TinyBackbone: the protocol over the closed vocabulary
# ---------------------------------------------------------------------------------------------------------------
class TinyBackbone(nn.Module):
    """R2ec's from-scratch backbone: closed vocabulary, token prompts, `TinyCausalLM`.

    Warm-up language-model loss (`warmup_states`): next-token CE on sampled user-prompt positions (a prior over
    plausible items and attributes) plus the reasoning format the model is evaluated in, `[THINK] r_1..r_T [ANS]`,
    with `r2ec_sft_rationale`: `none` -> empty reasoning `[THINK] -> [ANS]`; `target_attrs` -> the target item's
    attribute tokens as a pseudo-rationale (a deviation: the paper has no annotation; it uses the label's
    attributes as one, so the reasoning learns to say what kind of item comes next). The format's positions are
    trained under the reasoning softmax that generation samples from, so greedy reasoning learns to stop."""

    answer_id, pad_id = ANS, PAD

    def __init__(self, config, dataset):
        super().__init__()
        self.hidden_size = config["hidden_size"]
        self.item_id_token = bool(config["r2ec_item_id_token"])
        self.max_tokens_per_field = config["r2ec_max_tokens_per_field"]
        self.rationale = config["r2ec_sft_rationale"] or "none"
        self.lm_positions = config["r2ec_lm_positions"]
        self.item_seq, self.item_seq_len = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
        self.rating_list_field = (config["RATING_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_list_field = (config["TIME_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_field = config["TIME_FIELD"]
        self.gap_to_target = bool(config["r2ec_time_gap_to_target"])
        n_gaps = config["r2ec_time_gap_buckets"] or 0
        text_fields = config["r2ec_text_fields"] if config["r2ec_text_fields"] is not None else "auto"
        if self.rationale not in RATIONALES:
            raise ValueError(f"r2ec_sft_rationale must be one of {list(RATIONALES)}, got {self.rationale!r}.")
        self.vocab, item_attr_tokens = build_vocabulary(
            dataset, text_fields, self.max_tokens_per_field, self.item_id_token, config["r2ec_vocab_min_freq"],
            config["r2ec_vocab_max"], bool(config["r2ec_use_rating_token"]), n_gaps, config["RATING_FIELD"],
        )
        if self.vocab.attributes is None:
            if not self.item_id_token:
                raise ValueError(
                    f"Dataset '{dataset.dataset_name}' has no item features and r2ec_item_id_token is false: items "
                    "would have no tokens at all. Fix: set r2ec_item_id_token: true or load item features."
                )
            self.no_features = (f"dataset '{dataset.dataset_name}' has no token/token_seq item features "
                                f"({missing_item_features(dataset) or 'r2ec_text_fields names none'})")
        if self.vocab.n_gaps:
            times = dataset.inter_feat[self.time_field].float()
            self.max_gap = float(times.max() - times.min()) or 1.0
        item_prompt, ans_pos = item_prompt_tokens(self.vocab, item_attr_tokens, self.item_id_token)
        self.register_buffer("item_prompt", item_prompt, persistent=False)
        self.register_buffer("item_ans_pos", ans_pos, persistent=False)
        hist_attr = history_attributes(item_attr_tokens, self.max_tokens_per_field, config["r2ec_hist_tokens_per_item"])
        self.register_buffer("hist_attr", hist_attr, persistent=False)
        kinds = list(config["r2ec_reason_tokens"] or ["items", "attributes"])
        self.register_buffer("reason_allowed", reasoning_token_mask(self.vocab, kinds, self.item_id_token),
                             persistent=False)
        v = self.vocab
        slot = 1 + int(self.item_id_token) + hist_attr.shape[1] + int(v.n_ratings > 0) + int(v.n_gaps > 0)
        self.max_prompt_len = 3 + config["MAX_ITEM_LIST_LENGTH"] * slot
        max_positions = max(self.max_prompt_len, item_prompt.shape[1]) + config["r2ec_max_reason_len"] + 2
        self.lm = TinyCausalLM(
            v.size, max_positions, self.hidden_size, config["n_layers"], config["n_heads"], config["inner_size"],
            config["hidden_dropout_prob"], config["attn_dropout_prob"], config["layer_norm_eps"] or 1e-12,
            config["initializer_range"] or 0.02,
        )
        self.max_reasoning_len = max_positions - max(self.max_prompt_len, item_prompt.shape[1]) - 2

    # -- prompts ----------------------------------------------------------------------------------------------------
    def user_prompts(self, interaction):
        items, lengths = interaction[self.item_seq], interaction[self.item_seq_len]
        ratings = interaction[self.rating_list_field].float() if self.vocab.n_ratings else None
        gaps = None
        if self.vocab.n_gaps:
            ref = interaction[self.time_field] if self.gap_to_target else None
            gaps = gap_buckets(interaction[self.time_list_field], lengths, ref, self.vocab.n_gaps, self.max_gap)
        return user_prompt_tokens(self.vocab, items, lengths, self.hist_attr, self.item_id_token, ratings, gaps)

    @staticmethod
    def repeat_prompts(prompt, k):
        return prompt.repeat_interleave(k, dim=0)

    def item_prompts(self, item_ids):
        return self.item_prompt[item_ids]

    def rationale_tokens(self, target_items, max_len):
        """`r_1 .. r_T [ANS]` the warm-up teaches after [THINK]: empty (`none`) or the target's attribute tokens
        that the reasoning may use (`target_attrs`), at most `max_len` of them."""
        b = len(target_items)
        if self.rationale == "none" or max_len == 0:
            return torch.full((b, 1), ANS, dtype=torch.long, device=target_items.device)
        attrs = self.hist_attr[target_items]
        attrs = compact(attrs * self.reason_allowed[attrs], pads_first=False)[:, :max_len]
        tokens = torch.cat([attrs, torch.zeros(b, 1, dtype=torch.long, device=attrs.device)], dim=1)
        tokens[torch.arange(b, device=attrs.device), (attrs != PAD).sum(dim=1)] = ANS
        return tokens

    # -- running the LM -------------------------------------------------------------------------------------------------
    @staticmethod
    def _lengths(tokens):
        return (tokens != PAD).sum(dim=1)

    def _run(self, tokens, past=None, start=None):
        """The LM over tokens (after a cache `past` whose rows hold `start` tokens); states aligned to the columns."""
        valid = tokens != PAD
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        if past is not None:
            positions = start[:, None] + positions
        return self.lm(tokens, valid, positions, past)

    def reason_logits(self, hidden):
        """LM-head logits restricted to the reasoning tokens (specials other than [ANS] masked)."""
        return self.lm.lm_logits(hidden).masked_fill(~self.reason_allowed, float("-inf"))

    def shares_prompts(self):
        """K rollouts of one prompt share one prompt forward (its keys/values repeated K times): exact when no
        dropout is active (RecPO runs without one)."""
        if not self.training:
            return True
        return not any(
            (isinstance(m, nn.Dropout) and m.p > 0) or (isinstance(m, _Block) and m.attn_dropout > 0)
            for m in self.lm.modules()
        )

    def set_dropout(self, p):
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, _Block):
                module.attn_dropout = p

    # -- the protocol ---------------------------------------------------------------------------------------------------
    def item_states(self, item_ids):
        tokens = self.item_prompt[item_ids]
        hidden, _ = self._run(tokens)
        return hidden[torch.arange(len(item_ids), device=tokens.device), self.item_ans_pos[item_ids]]

    @torch.no_grad()
    def generate(self, prompt, max_len, temperature=0.0, top_k=0, top_p=1.0, group_size=1):
        if group_size > 1 and not self.shares_prompts():
            prompt, group_size = self.repeat_prompts(prompt, group_size), 1
        hidden, past = self._run(prompt)
        last, position = hidden[:, -1], self._lengths(prompt)
        if group_size > 1:
            last, position = last.repeat_interleave(group_size, 0), position.repeat_interleave(group_size, 0)
            past = _repeat_cache(past, group_size)
        return self._decode(last, past, position, max_len, temperature, top_k, top_p)

    @torch.no_grad()
    def _decode(self, last, past, position, max_len, temperature, top_k, top_p):
        n = last.shape[0]
        finished = torch.zeros(n, dtype=torch.bool, device=last.device)
        ans_state = torch.zeros_like(last)
        steps, sampled = [], []
        for t in range(max_len + 1):
            if t < max_len:
                token = sample_next_token(self.reason_logits(last), temperature, top_k, top_p)
                sampled.append(~finished)
            else:  # the budget is spent: [ANS] is forced (not an action of the policy)
                token = torch.full_like(finished, ANS, dtype=torch.long)
                sampled.append(torch.zeros_like(finished))
            token = token.masked_fill(finished, PAD)
            steps.append(token)
            hidden, past = self._run(token[:, None], past, position)
            position = position + (token != PAD).long()
            last = hidden[:, -1]
            now = token == ANS
            ans_state[now] = last[now]
            finished |= now
            if bool(finished.all()):
                break
        return Reasoning(torch.stack(steps, dim=1), torch.stack(sampled, dim=1), ans_state)

    def _continue(self, prompt_hidden, past, start, reasoning, group_size=1):
        """States over [THINK] + reasoning after a prompt cache: (state at [ANS], log-prob of each reasoning token)."""
        if group_size > 1:
            past, start = _repeat_cache(past, group_size), start.repeat_interleave(group_size, 0)
            prompt_hidden = prompt_hidden.repeat_interleave(group_size, 0)
        reason_hidden, _ = self._run(reasoning, past, start)
        states = torch.cat([prompt_hidden[:, -1:], reason_hidden], dim=1)  # the [THINK] column, then the reasoning
        h = states[torch.arange(len(reasoning), device=reasoning.device), 1 + answer_columns(reasoning, ANS)]
        logits = self.reason_logits(states[:, :-1])  # each reasoning token predicted from the column before it
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, reasoning[..., None]).squeeze(-1)
        return h, token_logp.masked_fill(reasoning == PAD, 0.0)

    def answer_states(self, prompt, reasoning, group_size=1):
        """With K > 1 and `shares_prompts`, the prompt runs once and its keys/values are repeated K times (the
        gradient reaches the prompt through all K): the numbers of K prompt copies for K times less compute."""
        if group_size > 1 and not self.shares_prompts():
            prompt, group_size = self.repeat_prompts(prompt, group_size), 1
        prompt_hidden, past = self._run(prompt)
        return self._continue(prompt_hidden, past, self._lengths(prompt), reasoning, group_size)

    def warmup_states(self, prompt, target_items, mode, max_len, temperature=1.0, top_k=0, top_p=1.0):
        """One prompt forward with grad; the warm-up reasoning decoded from its cache (no grad), the state at [ANS]
        after it; the LM loss on prompt positions + the rationale format (`rationale_tokens`)."""
        prompt_hidden, past = self._run(prompt)
        start = self._lengths(prompt)
        if mode == "empty":
            reasoning = torch.full((len(prompt), 1), ANS, dtype=torch.long, device=prompt.device)
        else:
            temp = 0.0 if mode == "greedy" else temperature
            reasoning = self._decode(prompt_hidden[:, -1].detach(), _detach_cache(past), start, max_len, temp,
                                     top_k, top_p).tokens
        h_u, _ = self._continue(prompt_hidden, past, start, reasoning)
        rationale = self.rationale_tokens(target_items, max_len)
        _, rationale_logp = self._continue(prompt_hidden, past, start, rationale)
        format_loss = -rationale_logp.sum() / (rationale != PAD).sum()
        return h_u, self.prompt_lm_loss(prompt, prompt_hidden) + format_loss

    def prompt_lm_loss(self, prompt, hidden):
        """Causal LM loss on at most `r2ec_lm_positions` random next-token positions of the user prompts (the full
        [B, S, V] logits do not fit a CPU batch)."""
        target = prompt[:, 1:]
        rows, cols = torch.nonzero((target != PAD) & (prompt[:, :-1] != PAD), as_tuple=True)
        if len(rows) > self.lm_positions:
            pick = torch.randperm(len(rows), device=prompt.device)[: self.lm_positions]
            rows, cols = rows[pick], cols[pick]
        return F.cross_entropy(self.lm.lm_logits(hidden[rows, cols]), target[rows, cols])

    # -- the reasoning-content control ---------------------------------------------------------------------------------
    def _content_tokens(self):
        allowed = self.reason_allowed.clone()
        allowed[ANS] = False
        return torch.nonzero(allowed).squeeze(1)

    def constant_reasoning(self, like):
        """`like`'s lengths, every reasoning token replaced by one fixed token (the first allowed one)."""
        tokens = like.tokens.clone()
        content = (tokens != PAD) & (tokens != ANS)
        tokens[content] = self._content_tokens()[0]
        return Reasoning(tokens, like.sampled.clone())

    def random_reasoning(self, like, generator=None):
        """`like`'s lengths, every reasoning token replaced by a uniform random allowed token."""
        tokens = like.tokens.clone()
        content = (tokens != PAD) & (tokens != ANS)
        pool = self._content_tokens()
        pick = torch.randint(len(pool), (int(content.sum()),), generator=generator, device="cpu").to(pool.device)
        tokens[content] = pool[pick]
        return Reasoning(tokens, like.sampled.clone())

    def render(self, tokens, dataset):
        return [render_token(self.vocab, dataset, int(t)) for t in tokens if int(t) != PAD]

    def describe(self):
        v = self.vocab
        if v.attributes is None:
            return f"R2ec: {self.no_features}; items are described by their ID token alone ({v.size} tokens)."
        return (f"R2ec vocabulary: {v.size} tokens ({len(SPECIALS)} specials, "
                f"{v.n_items if self.item_id_token else 0} item IDs, {len(v.attr_global)} attribute values "
                f"from {v.attributes.fields if v.attributes else []}, {v.n_ratings} ratings, {v.n_gaps} time gaps)")
