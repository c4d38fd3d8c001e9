"""Layers shared by the plugin's models.

`CachedTransformerEncoder` is RecBole's post-LN `TransformerEncoder` (same parameters and names, so SASRec
checkpoints load into it) with one more entry point, `forward_cached`, that feeds only the *new* tokens through
each layer and attends to the keys/values cached from earlier calls. In eval mode, appending tokens one call at
a time gives exactly the outputs of one causal pass over the whole extended sequence.
"""

import torch
from recbole.model.layers import TransformerEncoder

MASKED = -10000.0  # RecBole's additive mask value: keeps fully-masked (padding) rows finite


def transformer_encoder_settings(model, n_layers=None):
    """RecBole's `TransformerEncoder` arguments from a model's SASRec-style attributes (its own `n_layers` unless
    another depth is given), for every encoder built on those settings."""
    return dict(
        n_layers=model.n_layers if n_layers is None else n_layers,
        n_heads=model.n_heads,
        hidden_size=model.hidden_size,
        inner_size=model.inner_size,
        hidden_dropout_prob=model.hidden_dropout_prob,
        attn_dropout_prob=model.attn_dropout_prob,
        hidden_act=model.hidden_act,
        layer_norm_eps=model.layer_norm_eps,
    )


def causal_attention_bias(key_is_valid, n_queries):
    """Additive bias [B, 1, Q, S] for the last `n_queries` of S positions: query i (at absolute position
    S - Q + i) may attend to key j iff j <= its position and key j is valid (not padding)."""
    n_keys = key_is_valid.size(1)
    query_positions = torch.arange(n_keys - n_queries, n_keys, device=key_is_valid.device)
    key_positions = torch.arange(n_keys, device=key_is_valid.device)
    allowed = (key_positions[None, :] <= query_positions[:, None])[None] & key_is_valid[:, None, :]
    return torch.where(allowed, 0.0, MASKED).unsqueeze(1)


def prefix_attention_bias(key_is_valid, n_queries, n_prefix):
    """Prefix masking (ReaRec on BERT4Rec): like `causal_attention_bias`, but the first `n_prefix` positions (the
    item tokens) are bidirectional among themselves; later positions (reasoning tokens) attend causally, to every
    valid prefix key and to themselves and earlier reasoning tokens. Prefix queries never see later positions."""
    n_keys = key_is_valid.size(1)
    query_positions = torch.arange(n_keys - n_queries, n_keys, device=key_is_valid.device)
    key_positions = torch.arange(n_keys, device=key_is_valid.device)
    visible = (key_positions[None, :] <= query_positions[:, None]) | (
        (key_positions[None, :] < n_prefix) & (query_positions[:, None] < n_prefix)
    )
    allowed = visible[None] & key_is_valid[:, None, :]
    return torch.where(allowed, 0.0, MASKED).unsqueeze(1)


class CachedTransformerEncoder(TransformerEncoder):
    def forward_cached(self, hidden, attention_bias, past=None):
        """hidden: [B, Q, H] new tokens; attention_bias: [B, 1, Q, S] over all S = past + Q keys;
        past: per-layer (key, value) from earlier calls or None. Returns (last-layer output, new per-layer cache)."""
        present = []
        for index, layer in enumerate(self.layer):
            attention = layer.multi_head_attention
            hidden, cache = self._attend(attention, hidden, attention_bias, None if past is None else past[index])
            hidden = layer.feed_forward(hidden)
            present.append(cache)
        return hidden, present

    @staticmethod
    def _attend(attention, hidden, attention_bias, past):
        batch, n_new, _ = hidden.shape
        heads, head_size = attention.num_attention_heads, attention.attention_head_size

        def split_heads(x):  # [B, T, H] -> [B, heads, T, head_size]
            return x.view(batch, -1, heads, head_size).transpose(1, 2)

        query = split_heads(attention.query(hidden))
        key = split_heads(attention.key(hidden))
        value = split_heads(attention.value(hidden))
        if past is not None:
            key = torch.cat([past[0], key], dim=2)
            value = torch.cat([past[1], value], dim=2)
        scores = torch.matmul(query, key.transpose(-1, -2)) / attention.sqrt_attention_head_size + attention_bias
        probs = attention.attn_dropout(attention.softmax(scores))
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, n_new, attention.all_head_size)
        output = attention.LayerNorm(attention.out_dropout(attention.dense(context)) + hidden)
        return output, (key, value)
