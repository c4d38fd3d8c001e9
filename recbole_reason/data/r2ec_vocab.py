"""R2ec's closed vocabulary and its token prompts (the tiny backbone's language), and rendering them as words.

One token space built from the dataset: 8 specials, one token per item (`r2ec_item_id_token`), the item features'
attribute values (`item_features.item_attributes`: ml-100k title words, release year, genres; Amazon attributes),
rating tokens 1..10 and log-scale time-gap buckets. Prompts (spec 6.2):

    user  [BOS] [HIST] (<item-ID> <attrs> <rating>? <gap>? [SEP])*L [THINK]      left-padded, [THINK] last
    item  [ITEMP] <item-ID> <attrs> [ANS]                                         right-padded
    reasoning  r_1 .. r_T [ANS]                                                   PAD after [ANS]
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recbole_reason.data.item_features import item_attributes, item_feature_fields
from recbole_reason.data.item_features import item_title as title_of

SPECIALS = ("[PAD]", "[BOS]", "[HIST]", "[SEP]", "[ITEMP]", "[THINK]", "[ANS]", "[UNK]")
PAD, BOS, HIST, SEP, ITEMP, THINK, ANS, UNK = range(len(SPECIALS))
REASON_TOKEN_KINDS = ("items", "attributes", "ratings", "gaps")


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


def compact(tokens, pads_first):
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
        # tokens; ratings of later splits outside the training range are clamped into it (user_prompt_tokens).
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
            block = compact(attributes.tokens[:, start:start + width], pads_first=False)[:, :max_tokens_per_field]
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


def item_prompt_tokens(vocab, item_attr_tokens, item_id_token):
    """`[ITEMP] <item-ID> <attrs> [ANS]` per item, right-padded, and the column of each item's [ANS]."""
    n_items = vocab.n_items
    ids = (vocab.item_offset + torch.arange(n_items))[:, None] if item_id_token else None
    parts = [torch.full((n_items, 1), ITEMP)] + ([ids] if ids is not None else []) + [item_attr_tokens]
    body = compact(torch.cat(parts, dim=1), pads_first=False)
    ans_pos = (body != PAD).sum(dim=1)
    prompt = torch.cat([body, torch.zeros(n_items, 1, dtype=torch.long)], dim=1)
    prompt[torch.arange(n_items), ans_pos] = ANS
    return prompt, ans_pos


def history_attributes(item_attr_tokens, max_tokens_per_field, width):
    """The `width` attribute tokens each history item shows in a user prompt: the first attribute of each field,
    then the second, ... (a title word, the year and a genre rather than three title words)."""
    n_items = item_attr_tokens.shape[0]
    n_fields = item_attr_tokens.shape[1] // max_tokens_per_field
    round_robin = item_attr_tokens.view(n_items, n_fields, max_tokens_per_field).transpose(1, 2)
    return compact(round_robin.flatten(1), pads_first=False)[:, :width]


def reasoning_token_mask(vocab, kinds, item_id_token):
    """[vocab] True at the tokens a reasoning may use: [ANS] and the chosen kinds (never the padding item)."""
    allowed = torch.zeros(vocab.size, dtype=torch.bool)
    allowed[ANS] = True
    if "items" in kinds and item_id_token:
        allowed[vocab.item_offset + 1: vocab.item_offset + vocab.n_items] = True
    if "attributes" in kinds:
        allowed[vocab.attr_offset: vocab.attr_offset + len(vocab.attr_global)] = True
    if "ratings" in kinds:
        allowed[vocab.rating_offset: vocab.rating_offset + vocab.n_ratings] = True
    if "gaps" in kinds:
        allowed[vocab.gap_offset: vocab.gap_offset + vocab.n_gaps] = True
    return allowed


def user_prompt_tokens(vocab, items, lengths, hist_attr, item_id_token, ratings=None, gaps=None):
    """`[BOS] [HIST] (<item-ID> <attrs> <rating>? <gap>? [SEP])*L [THINK]`, left-padded: every row ends in [THINK]
    at the last column, so generated tokens are appended at one column for the whole batch.
    items [B, L] (right-padded history), ratings [B, L] raw ratings or None, gaps [B, L] gap buckets or None."""
    b, length = items.shape
    real = torch.arange(length, device=items.device)[None, :] < lengths[:, None]
    parts = []
    if item_id_token:
        parts.append((vocab.item_offset + items)[..., None])
    parts.append(hist_attr[items])
    if ratings is not None:
        ratings = ratings.round().long().clamp(1, vocab.n_ratings)
        parts.append((vocab.rating_offset + ratings - 1)[..., None])
    if gaps is not None:
        parts.append((vocab.gap_offset + gaps.clamp(0, vocab.n_gaps - 1))[..., None])
    parts.append(torch.full((b, length, 1), SEP, device=items.device))
    slots = torch.cat(parts, dim=2) * real[..., None]
    head = torch.tensor([BOS, HIST], device=items.device).expand(b, 2)
    tokens = torch.cat([head, slots.flatten(1), torch.full((b, 1), THINK, device=items.device)], dim=1)
    tokens = compact(tokens, pads_first=True)
    keep = int((tokens != PAD).sum(dim=1).max())
    return tokens[:, -keep:]


def gap_buckets(times, lengths, ref_times, n_gaps, max_gap):
    """Log-scale time-gap bucket of each history item: gap to `ref_times` [B] (the target's time, as the paper:
    leaks), or to the last history item when `ref_times` is None (leak-free default)."""
    times = times.float()
    last = times.gather(1, (lengths - 1).clamp(min=0)[:, None])
    ref = last if ref_times is None else ref_times.float()[:, None]
    gap = (ref - times).clamp(min=0)
    return (torch.log1p(gap) / math.log1p(max_gap) * n_gaps).long()


def item_title(dataset, item):
    """An item's title, else its external id ('item 50')."""
    return title_of(dataset, item) or f"item {dataset.id2token(dataset.iid_field, item)}"


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
