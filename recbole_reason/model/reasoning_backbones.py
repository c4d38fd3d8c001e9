"""Sequence encoders that ReaRec's reasoning loop runs on (`rearec_backbone`).

ReaRec (arXiv 2503.22675) is backbone-agnostic: encode the history, read the state at the last position, feed it
back as a new input token plus a Reasoning Position Embedding, read the next state, and so on. A backbone here says
how to do those four things with one RecBole encoder, and registers that encoder's layers on the model under
RecBole's own attribute names, so a trained RecBole SASRec / BERT4Rec / GRU4Rec state dict loads into ReaRec and
`reason_step: 0` reproduces it:

    sasrec    RecBole's SASRec: causal post-LN Transformer; KV cache for the reasoning steps.
    bert4rec  RecBole's BERT4Rec with the paper's "prefix masking": the item tokens (and BERT4Rec's [mask] token
              appended after them, which reads out r_0) attend to each other bidirectionally; each reasoning token
              attends to every item and to the reasoning tokens before it (causal). Items never see reasoning
              tokens, so the prefix is encoded once and the steps run through a KV cache, exactly.
    gru4rec   RecBole's GRU4Rec: the GRU's last output, projected by GRU4Rec's own `dense` layer into the item
              embedding space, is fed back as the next input; the GRU hidden state carries the past (the
              recurrent analogue of the KV cache, exact by construction).

A backbone is a stateless strategy: its methods take the model, whose attributes hold the layers.
    build(model, config)              register the layers (RecBole's names, RecBole's registration order)
    init_weights(model, module)       the backbone model's own initialisation
    token_size(model)                 width of an input token (the RPE width)
    encode(model, seq, seq_len)       -> hidden state at the last position [B, h], memory for the steps
    step(model, token, memory)        one reasoning token [B, token_size] -> hidden [B, h], memory
    feedback(model, hidden)           what is fed back as the next token (before the RPE is added)
    readout(model, hidden)            the representation scored against the item table
    normalize_token(model, token)     the backbone's input normalisation applied to every reasoning token
    item_table(model), item_bias(model)   scores = readout . table^T (+ bias)
"""

import torch
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.gru4rec import GRU4Rec
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from recbole_reason.model.layers import (
    CachedTransformerEncoder, causal_attention_bias, prefix_attention_bias, transformer_encoder_settings,
)


class SASRecBackbone:
    """RecBole's SASRec: item + position embedding -> LayerNorm -> dropout -> causal Transformer; tied item table."""

    name = "sasrec"

    def build(self, model, config):
        model.item_embedding = nn.Embedding(model.n_items, model.hidden_size, padding_idx=0)
        model.position_embedding = nn.Embedding(model.max_seq_length, model.hidden_size)
        model.trm_encoder = self._encoder(model)
        # Applied to the item tokens once and to every reasoning token (the official wrapper's LN -> Dropout).
        model.LayerNorm = nn.LayerNorm(model.hidden_size, eps=model.layer_norm_eps)
        model.input_dropout = nn.Dropout(model.input_dropout_prob)

    @staticmethod
    def _encoder(model):
        return CachedTransformerEncoder(**transformer_encoder_settings(model))

    def init_weights(self, model, module):
        model._init_weights(module)

    def token_size(self, model):
        return model.hidden_size

    # -- encoding ---------------------------------------------------------------------------------------------
    def _attention_bias(self, key_is_valid, n_queries, n_items):
        return causal_attention_bias(key_is_valid, n_queries)

    def _prepare(self, model, item_seq, item_seq_len):
        return item_seq

    def _encode_items(self, model, item_seq, key_is_valid):
        """Every item position through the encoder under the backbone's mask -> (inputs, outputs, KV cache)."""
        n_items = item_seq.size(1)
        positions = torch.arange(n_items, device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        inputs = model.input_dropout(model.LayerNorm(model.item_embedding(item_seq) + model.position_embedding(positions)))
        hidden, cache = model.trm_encoder.forward_cached(inputs, self._attention_bias(key_is_valid, n_items, n_items))
        return inputs, hidden, cache

    def encode(self, model, item_seq, item_seq_len):
        item_seq = self._prepare(model, item_seq, item_seq_len)
        # Valid keys by length, not by id: reasoning tokens sit after the padding and must never attend to it.
        key_is_valid = torch.arange(item_seq.size(1), device=item_seq.device)[None, :] < item_seq_len[:, None]
        inputs, hidden, cache = self._encode_items(model, item_seq, key_is_valid)
        memory = {"cache": cache, "key_is_valid": key_is_valid, "inputs": [inputs], "n_items": item_seq.size(1)}
        return model.gather_indexes(hidden, item_seq_len - 1), memory

    def step(self, model, token, memory):
        key_is_valid = memory["key_is_valid"]
        key_is_valid = torch.cat([key_is_valid, key_is_valid.new_ones(key_is_valid.size(0), 1)], dim=1)
        memory["key_is_valid"] = key_is_valid
        if model.kv_cache:
            bias = self._attention_bias(key_is_valid, 1, memory["n_items"])
            hidden, memory["cache"] = model.trm_encoder.forward_cached(token.unsqueeze(1), bias, past=memory["cache"])
        else:  # full re-encode of [items, reasoning tokens so far]
            memory["inputs"].append(token.unsqueeze(1))
            extended = torch.cat(memory["inputs"], dim=1)
            bias = self._attention_bias(key_is_valid, extended.size(1), memory["n_items"])
            hidden, _ = model.trm_encoder.forward_cached(extended, bias)
        return hidden[:, -1], memory

    def feedback(self, model, hidden):
        return hidden  # h^L_{n+k-1}: the last layer's output

    def readout(self, model, hidden):
        return hidden

    def normalize_token(self, model, token):
        return model.input_dropout(model.LayerNorm(token))

    # -- scoring ----------------------------------------------------------------------------------------------
    def item_table(self, model):
        return model.item_embedding.weight

    def item_bias(self, model):
        return None


class BERT4RecBackbone(SASRecBackbone):
    """RecBole's BERT4Rec under prefix masking. r_0 is read at BERT4Rec's [mask] token, appended after the history
    exactly as RecBole's `BERT4Rec.reconstruct_test_data` does (which also drops the oldest item), and scored through
    BERT4Rec's output head (Linear -> GELU -> LayerNorm) against the item table plus its output bias. The reasoning
    tokens are fed the encoder's last-layer output (before the head), like SASRec's."""

    name = "bert4rec"

    def build(self, model, config):
        model.mask_token = model.n_items
        model.item_embedding = nn.Embedding(model.n_items + 1, model.hidden_size, padding_idx=0)  # + [mask]
        model.position_embedding = nn.Embedding(model.max_seq_length, model.hidden_size)
        model.trm_encoder = self._encoder(model)
        model.LayerNorm = nn.LayerNorm(model.hidden_size, eps=model.layer_norm_eps)
        model.input_dropout = nn.Dropout(model.input_dropout_prob)
        model.output_ffn = nn.Linear(model.hidden_size, model.hidden_size)
        model.output_gelu = nn.GELU()
        model.output_ln = nn.LayerNorm(model.hidden_size, eps=model.layer_norm_eps)
        model.output_bias = nn.Parameter(torch.zeros(model.n_items))

    def _attention_bias(self, key_is_valid, n_queries, n_items):
        return prefix_attention_bias(key_is_valid, n_queries, n_prefix=n_items)

    def _prepare(self, model, item_seq, item_seq_len):
        return BERT4Rec.reconstruct_test_data(model, item_seq, item_seq_len)  # [mask] at index item_seq_len - 1

    def encode_all_positions(self, model, item_seq):
        """BERT4Rec's forward over every position (bidirectional, no reasoning) -> head output [B, L, d]: the
        cloze objective reads it at the masked positions."""
        _, hidden, _ = self._encode_items(model, item_seq, item_seq != 0)  # BERT4Rec's own mask: valid = non-zero id
        return self.readout(model, hidden)

    def readout(self, model, hidden):
        return model.output_ln(model.output_gelu(model.output_ffn(hidden)))

    def item_table(self, model):
        return model.item_embedding.weight[: model.n_items]  # without the [mask] token

    def item_bias(self, model):
        return model.output_bias


class GRU4RecBackbone:
    """RecBole's GRU4Rec: item embedding -> dropout -> GRU -> dense (to the embedding size); tied item table.
    Reasoning token k: dropout(dense(h_{n+k-1}) + pR_k), fed to the GRU from its hidden state at the last item."""

    name = "gru4rec"

    def build(self, model, config):
        model.item_embedding = nn.Embedding(model.n_items, model.embedding_size, padding_idx=0)
        model.emb_dropout = nn.Dropout(model.dropout_prob)
        model.gru_layers = nn.GRU(
            input_size=model.embedding_size,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            bias=False,
            batch_first=True,
        )
        model.dense = nn.Linear(model.hidden_size, model.embedding_size)

    def init_weights(self, model, module):
        GRU4Rec._init_weights(model, module)  # xavier for the embedding and the first GRU layer, as GRU4Rec

    def token_size(self, model):
        return model.embedding_size

    def encode(self, model, item_seq, item_seq_len):
        inputs = model.emb_dropout(model.item_embedding(item_seq))
        # Packing stops each row's GRU at its last real item, so the hidden state of *every* layer is the one the
        # reasoning token continues from (GRU4Rec itself runs over the padding and reads the output at len - 1).
        packed = pack_padded_sequence(inputs, item_seq_len.cpu(), batch_first=True, enforce_sorted=False)
        _, hidden_state = model.gru_layers(packed)  # [num_layers, B, h]
        return hidden_state[-1], hidden_state

    def step(self, model, token, memory):
        output, hidden_state = model.gru_layers(token.unsqueeze(1), memory)
        return output[:, 0], hidden_state

    def feedback(self, model, hidden):
        return model.dense(hidden)  # back into the input (item embedding) space

    def readout(self, model, hidden):
        return model.dense(hidden)

    def normalize_token(self, model, token):
        return model.emb_dropout(token)

    def item_table(self, model):
        return model.item_embedding.weight

    def item_bias(self, model):
        return None


BACKBONES = {backbone.name: backbone for backbone in (SASRecBackbone(), BERT4RecBackbone(), GRU4RecBackbone())}
