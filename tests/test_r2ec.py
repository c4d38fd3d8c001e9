"""R2ec + RecPO: vocabulary, reasoning stop, reward, advantages and the reference-code bug, heads, end to end."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_reason import create_dataset, get_model, get_trainer
from recbole_reason.compare import log_valid_scores
from recbole_reason.compat import load_checkpoint
from recbole_reason.data.r2ec_vocab import ANS, ITEMP, PAD, THINK, UNK, render_token
from recbole_reason.model.rl import (
    fused_reward,
    recpo_group_advantages,
    recpo_item_loss,
    recpo_token_loss,
    relabel_mask,
)

from conftest import DATA_PATH, TINY_CONFIG, tiny_config

# Small enough for a 2-core CPU: short histories, one layer, short reasoning, two rollouts.
SMALL = {
    "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 5,
    "r2ec_hist_tokens_per_item": 2, "r2ec_max_reason_len": 3, "r2ec_group_size": 2, "train_batch_size": 512,
    "r2ec_lm_positions": 256,
}
AMAZON = {
    "dataset": "tiny-amazon", "RATING_FIELD": None,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "attributes"]},
}


def _config(**overrides):
    return tiny_config("R2ec", {"dataset": "tiny", "data_path": DATA_PATH, **SMALL, **overrides})


def _prepare(config):
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


@pytest.fixture(scope="module")
def tiny_data():
    config = _config()
    return (config, *_prepare(config))


def _model(tiny_data, **overrides):
    config = _config(**overrides) if overrides else tiny_data[0]
    init_seed(config["seed"], config["reproducibility"])
    return get_model("R2ec")(config, tiny_data[2]._dataset)


def _batch(tiny_data, n=32):
    return next(iter(tiny_data[2]))[:n]


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------
def test_vocabulary_is_built_from_item_features(tiny_data):
    dataset = tiny_data[1]
    model = _model(tiny_data)
    vocab = model.vocab
    assert vocab.attributes.fields == ["movie_title", "release_year", "class"]
    assert len(vocab.attr_global) > 0 and vocab.n_ratings == 5
    assert vocab.size == vocab.attr_offset + len(vocab.attr_global) + vocab.n_ratings
    # Item 1's prompt: [ITEMP] <its ID token> <its attributes> [ANS], and the genre tokens render as its genres.
    item = 1
    row = model.backbone.item_prompt[item]
    assert row[0] == ITEMP and row[1] == vocab.item_offset + item and row[model.backbone.item_ans_pos[item]] == ANS
    rendered = {model_render(model, dataset, int(t)) for t in row if vocab.kind(int(t)) == "attribute"}
    genres = {f"class:{dataset.id2token('class', int(g))}" for g in dataset.get_item_feature()["class"][item] if g > 0}
    assert genres & rendered, (genres, rendered)
    # A stricter frequency threshold sends more attribute values to [UNK].
    strict = _model(tiny_data, r2ec_vocab_min_freq=50)
    assert len(strict.vocab.attr_global) < len(vocab.attr_global)
    assert (strict.backbone.item_prompt == UNK).sum() > (model.backbone.item_prompt == UNK).sum()


def model_render(model, dataset, token):
    return render_token(model.vocab, dataset, token)


def test_vocabulary_with_amazon_attributes_and_without_features(tiny_data, caplog):
    config = _config(**AMAZON)
    dataset, train_data, _, _ = _prepare(config)
    model = get_model("R2ec")(config, train_data._dataset)
    assert model.vocab.attributes.fields == ["attributes"] and model.vocab.n_ratings == 0

    caplog.set_level(logging.INFO)
    bare = {**AMAZON, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
    config = _config(**bare)
    dataset, train_data, _, _ = _prepare(config)
    model = get_model("R2ec")(config, train_data._dataset)
    assert model.vocab.attributes is None
    assert "described by their ID token alone" in caplog.text
    assert model.backbone.item_prompt.shape[1] == 3  # [ITEMP] <ID> [ANS]
    batch = next(iter(train_data))[:8]
    assert torch.isfinite(sum(model.calculate_loss(batch))).all()
    with pytest.raises(ValueError, match="r2ec_item_id_token"):
        get_model("R2ec")(_config(**bare, r2ec_item_id_token=False), train_data._dataset)


# ----------------------------------------------------------------------------------------------------------------
# Bad settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [("r2ec_group_size", 1), ("r2ec_max_reason_len", 0), ("r2ec_relabel_topk", 3), ("r2ec_sim_temperature", 0),
     ("r2ec_advantage_type", "rloo"), ("r2ec_reason_tokens", ["words"]), ("r2ec_warmup_candidates", "all"),
     ("recpo_item_candidates", "all"), ("recpo_item_trajectories", "best"),
     ("r2ec_sft_rationale", "gold"), ("r2ec_backbone", "gpt")],
)
def test_bad_settings_raise_clear_errors(tiny_data, key, value):
    with pytest.raises(ValueError, match=key):
        _model(tiny_data, **{key: value})


def test_transformers_is_imported_only_when_configured(tiny_data, monkeypatch):
    # In a fresh interpreter: earlier tests of the same process (the hf backbone's) may have imported transformers.
    script = ("import sys; sys.argv = ['x']; from recbole_reason import Config, create_dataset, get_model; "
              f"config = Config(model='R2ec', config_file_list=[{TINY_CONFIG!r}], "
              f"config_dict={{'dataset': 'tiny', 'data_path': {DATA_PATH!r}, **{SMALL!r}}}); "
              "from recbole.data import data_preparation; train_data = data_preparation(config, create_dataset(config))[0]; "
              "get_model('R2ec')(config, train_data._dataset); "
              "print(sorted({'transformers', 'recbole_reason.model.r2ec_llm'} & set(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              cwd=os.getcwd()).stdout.strip().splitlines()[-1]
    assert imported == "[]", imported
    # Without the [llm] extra (the module cannot be imported), the hf backbone is one line naming the install.
    monkeypatch.setitem(sys.modules, "recbole_reason.model.r2ec_llm", None)
    with pytest.raises(ValueError, match=r'^r2ec_backbone: hf needs the LLM extra .*pip install -e "\.\[llm\]"'):
        _model(tiny_data, r2ec_backbone="hf")


# ----------------------------------------------------------------------------------------------------------------
# Reasoning (lm head)
# ----------------------------------------------------------------------------------------------------------------
def test_reasoning_stops_at_answer_or_at_the_length_limit(tiny_data):
    model = _model(tiny_data).eval()
    prompt = model.user_prompt(_batch(tiny_data, 8))
    assert (prompt[:, -1] == THINK).all()

    # [ANS] is the only allowed token: the reasoning is [ANS] itself, sampled, at step 1.
    model.reason_allowed.zero_()
    model.reason_allowed[ANS] = True
    reasoning, sampled, _ = model.generate_reasoning(prompt, temperature=1.0, top_k=5)
    assert reasoning.shape == (8, 1) and (reasoning == ANS).all() and sampled.all()

    # [ANS] forbidden: the budget is spent, then [ANS] is forced (and is not a policy action).
    model.reason_allowed.fill_(True)
    model.reason_allowed[: ANS + 2] = False
    reasoning, sampled, _ = model.generate_reasoning(prompt, temperature=1.0, top_k=5)
    assert reasoning.shape == (8, model.max_reason_len + 1)
    assert (reasoning[:, -1] == ANS).all() and (reasoning[:, :-1] != ANS).all()
    assert sampled[:, :-1].all() and not sampled[:, -1].any()


def test_kv_cache_generation_matches_one_full_forward(tiny_data):
    model = _model(tiny_data).eval()
    prompt = model.user_prompt(_batch(tiny_data, 16))
    torch.manual_seed(0)
    reasoning, _, h_cached = model.generate_reasoning(prompt, temperature=1.0, top_k=0)
    with torch.no_grad():
        h_full, token_logp, _ = model.forward_with_reasoning(prompt, reasoning)
    assert (reasoning == ANS).sum(dim=1).eq(1).all()
    assert torch.allclose(h_cached, h_full, atol=1e-5)
    assert (token_logp[reasoning == PAD] == 0).all() and (token_logp[reasoning != PAD] < 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Reward, advantages, losses (hand-made tensors)
# ----------------------------------------------------------------------------------------------------------------
def test_fused_reward_on_a_hand_made_ranking():
    scores = torch.tensor([[-float("inf"), 5.0, 4.0, 3.0, 2.0], [-float("inf"), 5.0, 4.0, 3.0, 2.0]])
    w = 0.05
    reward = fused_reward(scores, torch.tensor([1, 3]), ndcg_k=4, softmax_weight=w)
    prob = torch.softmax(scores, dim=1)
    assert torch.allclose(reward[0], (1 - w) * 1.0 + w * prob[0, 1])  # rank 1: NDCG term 1
    assert torch.allclose(reward[1], (1 - w) * 0.5 + w * prob[1, 3])  # rank 3: 1 / log2(4)
    # Rank beyond k: only the softmax term, which lies in (0, 1).
    beyond = fused_reward(scores[1:], torch.tensor([4]), ndcg_k=3, softmax_weight=w)
    assert torch.allclose(beyond, w * prob[1:, 4]) and 0 < beyond.item() < w
    # A masked (history) item above the target no longer counts: rank 3 becomes rank 2.
    masked = scores[1:].clone()
    masked[0, 1] = -float("inf")
    assert torch.allclose(fused_reward(masked, torch.tensor([3]), 4, 0.0), torch.tensor([1 / torch.log2(torch.tensor(3.0))]))


def test_history_mask_hides_history_but_not_the_target(tiny_data):
    model = _model(tiny_data)
    batch = _batch(tiny_data, 4)
    mask = model._history_mask(batch, 8)
    assert mask.shape == (8, model.n_items) and mask[:, 0].all()
    for row in range(4):
        history = batch["item_id_list"][row, : batch["item_length"][row]]
        assert mask[2 * row, history[history != batch["item_id"][row]]].all()
        assert not mask[2 * row + 1, batch["item_id"][row]]


def test_advantages_sum_to_zero_per_group_and_reasoning_gradient_is_nonzero():
    rewards = torch.tensor([[0.9, 0.1, 0.4, 0.2], [0.3, 0.3, 0.3, 0.3]])
    adv = recpo_group_advantages(rewards, "gaussian")
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv[0].std(), torch.tensor(1.0), atol=1e-4) and (adv[1] == 0).all()
    loo = recpo_group_advantages(rewards, "leave-one-out")
    assert torch.allclose(loo[0], rewards[0] * 1.25 - rewards[0].mean())

    # Per-trajectory token loss: each A_i reaches only its own tokens: d loss / d logp_it = -A_i / n_tokens.
    logp = torch.randn(2, 4, 3).requires_grad_()
    mask = torch.ones(2, 4, 3)
    recpo_token_loss(logp, mask, adv, 0.2, 0.28).backward()
    assert torch.allclose(logp.grad, -adv[..., None].expand(2, 4, 3) / mask.sum())
    assert logp.grad[0].abs().max() > 1e-2
    # The official code's broadcast (code_compat): one group per mini-batch => numerically zero gradient.
    logp.grad = None
    recpo_token_loss(logp, mask, adv, 0.2, 0.28, code_compat=True).backward()
    assert logp.grad.abs().max() < 1e-7


def test_item_loss_weights_only_relabelled_trajectories():
    adv = recpo_group_advantages(torch.tensor([[0.9, 0.1, 0.4, 0.2]]), "gaussian")
    relabel = relabel_mask(adv, 1)
    assert relabel.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.full((1, 4), 2)
    recpo_item_loss(logits, labels, adv, relabel, 0.2, 0.28).backward()
    grad = logits.grad[0]
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    assert grad[0, 2] < 0  # positive advantage: the target's logit goes up (InfoNCE direction)
    logits.grad = None
    recpo_item_loss(logits, labels, adv, relabel, 0.2, 0.28, code_compat=True).backward()
    assert (logits.grad[0].abs().sum(dim=1) > 0).all()  # the bug: every trajectory, same weight


def test_recpo_reasoning_gradient_reaches_the_model_and_code_compat_kills_it(tiny_data):
    batch = _batch(tiny_data, 16)
    norms = {}
    for compat in (False, True):
        model = _model(tiny_data, r2ec_code_compat=compat, r2ec_item_loss_weight=0.0, r2ec_gen_temperature=1.0)
        model.set_dropout(0.0)
        model.refresh_item_table()
        torch.manual_seed(1)
        (token_loss, item_loss), stats = model.recpo_loss(batch)
        assert item_loss.item() == 0.0 and 0 <= stats["reward"] <= 1
        token_loss.backward()
        norms[compat] = model.backbone.lm.tok_emb.weight.grad.norm().item()
    assert norms[False] > 1e-4
    assert norms[True] < 1e-4 * norms[False]  # float rounding only: ~0 as in spec 2.1


def test_warmup_losses_catalogue_softmax_and_in_batch(tiny_data):
    batch = _batch(tiny_data, 16)
    model = _model(tiny_data, r2ec_lm_loss_weight=0.0, r2ec_warmup_reasoning="empty").eval()  # eval: no dropout
    loss = model.calculate_loss(batch)
    with torch.no_grad():
        h_u, _, _ = model.forward_with_reasoning(model.user_prompt(batch), torch.full((16, 1), ANS))
        items = model.encode_items(torch.arange(model.n_items))
    full = torch.nn.functional.cross_entropy(model.rec_head(h_u, items[1:]), batch["item_id"] - 1)
    assert torch.allclose(loss, full, atol=1e-5)  # catalogue: the softmax runs over every item
    assert model._table_dirty  # a training step invalidates the evaluation table

    in_batch = _model(tiny_data, r2ec_warmup_candidates="in_batch", r2ec_num_negatives=7)
    rec_loss, lm_loss = in_batch.calculate_loss(batch)
    assert rec_loss.item() > 0 and lm_loss.item() > 0
    (rec_loss + lm_loss).backward()
    assert in_batch.backbone.lm.tok_emb.weight.grad[in_batch.vocab.item_offset + batch["item_id"]].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Learning: the warm-up learns (no fresh-vs-stale shortcut, no collapse, the evaluated format), RecPO raises its reward
# ----------------------------------------------------------------------------------------------------------------
# 4 warm-up epochs (64 steps of 256 prefixes) on the tiny data; dropout off and tau 0.1 (spec: small models prefer
# 0.05-0.1) so that a few steps suffice.
LEARN = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "learning_rate": 0.01, "r2ec_sim_temperature": 0.1,
         "train_batch_size": 256, "epochs": 4, "eval_step": 4, "recpo_epochs": 0}


def _fresh_catalogue_ce(model, batch):
    """CE of the targets against every item encoded now (no cached rows), after the evaluated greedy reasoning."""
    model.eval()
    with torch.no_grad():
        _, _, h_u = model.generate_reasoning(model.user_prompt(batch), 0.0)
        items = model.encode_items(torch.arange(model.n_items))
        ce = torch.nn.functional.cross_entropy(model.rec_head(h_u, items[1:]), batch["item_id"] - 1).item()
    model.train()
    return ce, items[1:]


@pytest.fixture(scope="module")
def warmed(tiny_data):
    config = _config(**LEARN)
    _, train_data, valid_data, _ = _prepare(config)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("R2ec")(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    return config, model, trainer, train_data, valid_data


def test_warmup_learns_against_a_fresh_catalogue_without_collapse(warmed):
    """Fails on the old warm-up (fresh in-batch rows against a stale table): its training loss fell to ~5.3 by telling
    fresh rows from stale ones, while the CE against a freshly encoded catalogue stayed at ln(n_items) and the item
    states collapsed (mean cosine 0.99)."""
    config, model, _, train_data, _ = warmed
    batches = list(train_data)
    rows = torch.cat([b["item_id"] for b in batches])
    ce = [_fresh_catalogue_ce(model, b)[0] for b in batches[:4]]
    # The best history-free model of these rows (popularity): CE = entropy of their target distribution.
    counts = torch.bincount(rows, minlength=model.n_items).float()
    popularity_ce = [(-(counts[b["item_id"]] / counts.sum()).log().mean()).item() for b in batches[:4]]
    assert max(ce) < torch.log(torch.tensor(model.n_items - 1.0)).item() - 0.3
    assert sum(ce) / 4 < sum(popularity_ce) / 4 - 0.05, (ce, popularity_ce)
    items = _fresh_catalogue_ce(model, batches[0])[1]
    mean_cos = ((items @ items.t()).sum() - len(items)) / (len(items) * (len(items) - 1))
    assert mean_cos < 0.95, mean_cos


def test_warmed_up_greedy_reasoning_stops_at_answer_and_beats_popularity(warmed):
    """The warm-up trains the format it is evaluated in ([THINK] r_1..r_T [ANS]): greedy reasoning chooses [ANS]
    itself for some users (the old warm-up never trained the position after [THINK], so it ran to the budget), and
    valid NDCG@10 beats RecBole's Pop on the same split."""
    from recbole.model.general_recommender import Pop
    from recbole.trainer import Trainer

    config, model, trainer, train_data, valid_data = warmed
    model.eval()
    batch = next(iter(valid_data))[0]
    reasoning, sampled, _ = model.generate_reasoning(model.user_prompt(batch), 0.0)
    assert ((reasoning == ANS) & sampled).any(dim=1).float().mean() > 0.5
    r2ec_ndcg = trainer.evaluate(valid_data, load_best_model=False)["ndcg@10"]
    pop_config = _config(model="Pop")
    pop_config["model"] = "Pop"
    pop = Pop(pop_config, train_data._dataset)
    for b in train_data:
        pop.calculate_loss(b)
    pop_ndcg = Trainer(pop_config, pop).evaluate(valid_data, load_best_model=False)["ndcg@10"]
    assert r2ec_ndcg > 1.5 * pop_ndcg, (r2ec_ndcg, pop_ndcg)


def _recpo_copy(warm):
    import copy

    model = copy.deepcopy(warm)
    model.set_dropout(0.0)
    model.train()
    return model


def test_recpo_raises_the_mean_reward(warmed):
    """A few RecPO steps as the trainer takes them (each loss's gradient clipped to 1.0 on its own, then the sum
    clipped to 1.0) raise the mean sampled reward of the same users, rollouts drawn with the same seed."""
    from recbole_reason.model.rl import balanced_gradients

    config, warm, _, train_data, _ = warmed
    model = _recpo_copy(warm)
    batches = list(train_data)[:4]

    def mean_reward():
        model.refresh_item_table()
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model.recpo_loss(b)[1]["reward"] for b in batches) / len(batches)

    before = mean_reward()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(12):
        if step % 4 == 0:
            model.refresh_item_table()
        losses, _ = model.recpo_loss(batches[step % len(batches)])
        optimizer.zero_grad()
        balanced_gradients(losses, model.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    after = mean_reward()
    assert after > before * 1.02, (before, after)  # measured here: 0.162 -> 0.167


def test_balanced_recpo_update_lets_the_token_loss_move_the_lm_head(warmed):
    """At the paper's tau = 0.02 the item loss's gradient dwarfs the token loss's; summed, the LM head (the tied token
    embedding) moves in the item loss's direction. Clipped each on its own (`balanced_gradients`), the update on the
    head follows the token loss."""
    from recbole_reason.model.rl import balanced_gradients

    _, warm, _, train_data, _ = warmed
    model = _recpo_copy(warm)
    model.sim_temperature = 0.02
    head = model.backbone.lm.tok_emb.weight
    model.refresh_item_table()
    torch.manual_seed(0)
    (token_loss, item_loss), _ = model.recpo_loss(next(iter(train_data)))
    g_token = torch.autograd.grad(token_loss, head, retain_graph=True)[0]
    g_item = torch.autograd.grad(item_loss, head, retain_graph=True)[0]
    model.zero_grad()
    norms = balanced_gradients((token_loss, item_loss), model.parameters(), 1.0)
    cos = torch.nn.functional.cosine_similarity
    balanced = cos(head.grad.flatten(), g_token.flatten(), dim=0).item()
    plain = cos((g_token + g_item).flatten(), g_token.flatten(), dim=0).item()
    assert g_token.norm() > 0 and norms[1] > 3 * norms[0], norms
    assert balanced > 0.3 and balanced > plain + 0.2, (balanced, plain, norms)


# ----------------------------------------------------------------------------------------------------------------
# Item head
# ----------------------------------------------------------------------------------------------------------------
def test_item_head_cache_permutation_and_full_sort_predict(tiny_data):
    model = _model(tiny_data).eval()
    batch = _batch(tiny_data, 8)
    scores = model.full_sort_predict(batch)
    assert scores.shape == (8, model.n_items) and not model._table_dirty
    assert torch.equal(scores, model.full_sort_predict(batch))  # greedy reasoning: deterministic
    with torch.no_grad():
        fresh = model.encode_items(torch.arange(model.n_items))
    assert torch.allclose(model.item_table, fresh, atol=1e-6)
    perm = torch.randperm(model.n_items)
    h = torch.randn(3, model.hidden_size)
    assert torch.allclose(model.rec_head(h, fresh[perm]), model.rec_head(h, fresh)[:, perm], atol=1e-5)
    assert torch.allclose(model.predict(batch), scores.gather(1, batch["item_id"][:, None]).squeeze(1))
    model.train()
    assert model._table_dirty  # a training step invalidates the table; the next evaluation re-encodes it


# ----------------------------------------------------------------------------------------------------------------
# End to end: warm-up -> RecPO -> checkpoint reload -> explain
# ----------------------------------------------------------------------------------------------------------------
def test_warmup_then_recpo_end_to_end_with_checkpoint_reload(tiny_data, tmp_path):
    # The 31 users with at most 25 interactions: ~600 training prefixes keep both stages within a few seconds.
    config = _config(
        epochs=1, recpo_epochs=1, checkpoint_dir=str(tmp_path / "saved"), train_batch_size=128,
        r2ec_item_refresh_steps=2, user_inter_num_interval="[20,25]",
    )
    dataset, train_data, valid_data, test_data = _prepare(config)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("R2ec")(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)
    assert type(trainer).__name__ == "R2ecTrainer"
    trainer.fit(train_data, valid_data, saved=True)
    assert set(trainer.stage_results) == {"warmup", "recpo"} and trainer.recpo_steps == len(train_data)
    assert model.backbone.lm.drop.p == 0.0  # RecPO ran without dropout
    assert trainer.reference_model is None  # RecPO has no KL term: no frozen copy (it doubles an LLM's memory)
    result = trainer.evaluate(test_data, load_best_model=True)
    assert 0 <= result["ndcg@10"] <= 1

    checkpoint = load_checkpoint(trainer.saved_model_file)
    assert os.path.isfile(trainer.saved_model_file)
    reloaded = get_model("R2ec")(config, train_data._dataset)
    reloaded.load_state_dict(checkpoint["state_dict"])
    reloaded.eval()
    model.eval()
    batch = next(iter(test_data))[0]
    assert torch.allclose(model.full_sort_predict(batch), reloaded.full_sort_predict(batch), atol=1e-5)

    explained = reloaded.explain(dataset, [dataset.id2token("user_id", 1), 2], topk=3)  # external and internal ids
    assert len(explained) == 2 and len(explained[0]["top_items"]) == 3
    assert explained[0]["reasoning"][-1] == "[ANS]" and len(explained[0]["reasoning"]) <= config["r2ec_max_reason_len"] + 1
    assert all(isinstance(word, str) and word for word in explained[0]["reasoning"] + explained[0]["history"])
    assert not explained[0]["history"][0].startswith("item ")  # titles from movie_title, not raw ids


@pytest.mark.parametrize("value", [1.0, -0.1])  # a non-number is the config check's (the YAML default is a float)
def test_bad_recpo_dropout_is_a_clear_error_before_training(tiny_data, value):
    config = _config(recpo_dropout_prob=value)
    model = get_model("R2ec")(config, tiny_data[2]._dataset)
    with pytest.raises(ValueError, match="recpo_dropout_prob must be a number in \\[0, 1\\)"):
        get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)


def test_recpo_dropout_prob_keeps_dropout_in_recpo_and_evaluation_stays_deterministic(tiny_data):
    config = _config(recpo_dropout_prob=0.2)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("R2ec")(config, tiny_data[2]._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)
    trainer.start_post_training(tiny_data[2])
    blocks = [m for m in model.backbone.modules() if hasattr(m, "attn_dropout")]
    assert model.backbone.lm.drop.p == 0.2 and blocks and all(b.attn_dropout == 0.2 for b in blocks)
    batch = _batch(tiny_data, n=8)
    model.train()
    losses, _ = model.recpo_loss(batch)  # rollouts and their update both run with dropout
    assert all(torch.isfinite(loss) for loss in losses)
    model.eval()
    assert torch.equal(model.full_sort_predict(batch), model.full_sort_predict(batch))  # eval(): no dropout


def test_recpo_lr_warmup_ramps_the_rate_linearly_then_holds_it(tiny_data):
    config = _config(recpo_lr_warmup_steps=4, recpo_learning_rate=1e-3)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("R2ec")(config, tiny_data[2]._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)
    trainer._enter_post_stage(tiny_data[2], start_epoch=1)
    rates = []  # the rate each optimizer step of the RecPO epoch ran at
    trainer.optimizer.register_step_post_hook(lambda optimizer, *_: rates.append(optimizer.param_groups[0]["lr"]))
    model.train()
    trainer._train_epoch(tiny_data[2], 1)
    assert len(rates) == len(tiny_data[2]) >= 6
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4] + [1e-3] * (len(rates) - 3))
    with pytest.raises(ValueError, match="recpo_lr_warmup_steps must be >= 0"):
        get_trainer(config["MODEL_TYPE"], "R2ec")(_config(recpo_lr_warmup_steps=-1), model)


def test_recpo_entered_from_a_saved_warmup_repeats_the_in_fit_recpo_epoch(tiny_data, tmp_path, monkeypatch):
    """bench/post_training_probe.py enters RecPO from a saved warm-up (load weights, evaluate, `_enter_post_stage`):
    given the random state RecPO started from inside `fit`, it must give the same weights, so that a probe's result
    differs from the benchmark's only by that random state (issue 18's v4 probes rose where the in-fit runs fell)."""
    config = _config(epochs=1, recpo_epochs=1, checkpoint_dir=str(tmp_path / "saved"), train_batch_size=128,
                     user_inter_num_interval="[20,25]", save_resume_state=False)
    trainer_class = get_trainer(config["MODEL_TYPE"], "R2ec")
    entered = {}
    start = trainer_class.start_post_training

    def recording_start(self, train_data):
        entered["warmup"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        start(self, train_data)
        entered["rng"], entered["order"] = torch.get_rng_state(), train_data.generator.get_state()

    monkeypatch.setattr(trainer_class, "start_post_training", recording_start)
    _, train_data, valid_data, _ = _prepare(config)
    init_seed(config["seed"], config["reproducibility"])
    in_fit = get_model("R2ec")(config, train_data._dataset)
    trainer_class(config, in_fit).fit(train_data, valid_data, saved=True)
    monkeypatch.setattr(trainer_class, "start_post_training", start)

    _, train_data, valid_data, _ = _prepare(config)
    probe = get_model("R2ec")(config, train_data._dataset)
    trainer = trainer_class(config, probe)
    probe.load_state_dict(entered["warmup"])
    trainer.evaluate(valid_data, load_best_model=False)
    trainer._enter_post_stage(train_data, start_epoch=1)
    torch.set_rng_state(entered["rng"])
    train_data.generator.set_state(entered["order"])
    probe.train()
    trainer._train_epoch(train_data, 1)
    changed = [name for name, value in probe.state_dict().items() if not torch.equal(value, entered["warmup"][name])]
    assert changed  # RecPO moved the weights ...
    assert all(torch.equal(value, in_fit.state_dict()[name]) for name, value in probe.state_dict().items())  # ... alike


def test_fit_post_training_from_a_saved_warmup_keeps_it_unless_recpo_raises_valid(tiny_data, tmp_path):
    """`fit_post_training_from` (bench/r2ec_learns.py --first_stage_from): RecPO alone from a warm-up checkpoint, with
    that checkpoint's valid score as the one to beat, so RecPO and its control start from the same weights."""
    settings = dict(epochs=1, train_batch_size=128, user_inter_num_interval="[20,25]", save_resume_state=False)
    warm_config = _config(recpo_epochs=0, checkpoint_dir=str(tmp_path / "warmup"), **settings)
    _, train_data, valid_data, _ = _prepare(warm_config)
    init_seed(warm_config["seed"], warm_config["reproducibility"])
    trainer_class = get_trainer(warm_config["MODEL_TYPE"], "R2ec")
    warm_trainer = trainer_class(warm_config, get_model("R2ec")(warm_config, train_data._dataset))
    warm_valid, _ = warm_trainer.fit(train_data, valid_data, saved=True)
    warmup = torch.load(warm_trainer.saved_model_file, weights_only=False)

    config = _config(recpo_epochs=1, checkpoint_dir=str(tmp_path / "recpo"), **settings)
    model = get_model("R2ec")(config, train_data._dataset)
    trainer = trainer_class(config, model)
    log = log_valid_scores(trainer)
    best, _ = trainer.fit_post_training_from(warm_trainer.saved_model_file, train_data, valid_data, saved=True)
    assert [stage for stage, _ in log] == ["warmup", "recpo"]
    assert log[0][1] == pytest.approx(warm_valid)  # the warm-up's weights were loaded and scored
    recpo_valid = log[1][1]
    assert best == pytest.approx(max(warm_valid, recpo_valid))
    kept = torch.load(trainer.saved_model_file, weights_only=False)
    assert os.path.dirname(trainer.saved_model_file) == str(tmp_path / "recpo")  # the warm-up's file is untouched
    assert any(not torch.equal(v, warmup["state_dict"][k]) for k, v in model.state_dict().items())  # RecPO trained
    expected = model.state_dict() if recpo_valid > warm_valid else warmup["state_dict"]
    assert all(torch.equal(v, expected[k]) for k, v in kept["state_dict"].items())
    assert kept["stage"] == ("recpo" if recpo_valid > warm_valid else "warmup")

    kept["stage"] = "recpo"  # a checkpoint RecPO already improved on is not a first stage
    torch.save(kept, tmp_path / "recpo.pth")
    with pytest.raises(ValueError, match="recpo stage, not the warmup stage"):
        trainer_class(config, get_model("R2ec")(config, train_data._dataset)).fit_post_training_from(
            str(tmp_path / "recpo.pth"), train_data, valid_data)
    off = _config(recpo_epochs=0, checkpoint_dir=str(tmp_path / "off"), **settings)
    with pytest.raises(ValueError, match="recpo_epochs is 0"):
        trainer_class(off, get_model("R2ec")(off, train_data._dataset)).fit_post_training_from(
            warm_trainer.saved_model_file, train_data, valid_data)


def test_first_recpo_epoch_does_not_depend_on_how_many_follow(tiny_data, tmp_path, monkeypatch):
    """`recpo_epochs` sets only the stage's length: its first epoch gives the same weights at 1 and at 2, so a longer
    benchmark (issue 18's v5, 2 RecPO epochs) repeats the shorter one's first epoch on the same machine."""
    trainer_class = get_trainer("sequential", "R2ec")
    train_epoch, after_first = trainer_class._train_epoch, {}

    def recording_epoch(self, train_data, epoch_idx, *args, **kwargs):
        losses = train_epoch(self, train_data, epoch_idx, *args, **kwargs)
        if self.stage == self.post_stage and epoch_idx == self.start_epoch:
            after_first[self.post_epochs] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return losses

    monkeypatch.setattr(trainer_class, "_train_epoch", recording_epoch)
    for recpo_epochs in (1, 2):
        config = _config(epochs=1, recpo_epochs=recpo_epochs, checkpoint_dir=str(tmp_path / str(recpo_epochs)),
                         train_batch_size=128, user_inter_num_interval="[20,25]", save_resume_state=False)
        _, train_data, valid_data, _ = _prepare(config)
        init_seed(config["seed"], config["reproducibility"])
        model = get_model("R2ec")(config, train_data._dataset)
        trainer_class(config, model).fit(train_data, valid_data, saved=True)
    assert all(torch.equal(value, after_first[2][name]) for name, value in after_first[1].items())


def test_run_script_shows_the_reasoning_of_chosen_users(tmp_path):
    """`--explain_users=[...]` on the run script (here its Python twin) logs and returns R2ec's reasoning."""
    from recbole_reason import run_recbole_reason

    config_dict = {"data_path": DATA_PATH, **SMALL, "epochs": 1, "recpo_epochs": 0, "train_batch_size": 128,
                   "user_inter_num_interval": "[20,25]", "checkpoint_dir": str(tmp_path), "explain_users": [105, "107"]}
    result = run_recbole_reason("R2ec", "tiny", [TINY_CONFIG], config_dict, saved=False)
    assert [e["user"] for e in result["explanations"]] == ["105", "107"]
    assert all(e["reasoning"][-1] == "[ANS]" for e in result["explanations"])


def test_explain_users_on_a_model_without_reasoning_is_a_clear_error(tmp_path):
    from recbole_reason import run_recbole_reason

    with pytest.raises(ValueError, match="generates no readable reasoning"):
        run_recbole_reason("GRU4Rec", "tiny", [TINY_CONFIG], {"data_path": DATA_PATH, "checkpoint_dir": str(tmp_path),
                                                             "explain_users": ["105"]}, saved=False)


# ----------------------------------------------------------------------------------------------------------------
# Reasoning-content control: generated vs the same number of constant / random tokens
# ----------------------------------------------------------------------------------------------------------------
def test_constant_and_random_reasoning_keep_the_generated_lengths(tiny_data):
    model = _model(tiny_data).eval()
    prompt = model.user_prompt(_batch(tiny_data, 16))
    torch.manual_seed(0)
    generated = model.backbone.generate(prompt, 3, temperature=1.0)
    constant = model.backbone.constant_reasoning(generated)
    random_a = model.backbone.random_reasoning(generated, torch.Generator().manual_seed(1))
    random_b = model.backbone.random_reasoning(generated, torch.Generator().manual_seed(1))
    content = (generated.tokens != PAD) & (generated.tokens != ANS)
    assert content.any()
    for control in (constant, random_a):
        assert torch.equal(control.tokens == ANS, generated.tokens == ANS)
        assert torch.equal(control.tokens == PAD, generated.tokens == PAD)
        assert model.reason_allowed[control.tokens[content]].all()
    assert constant.tokens[content].unique().numel() == 1
    assert random_a.tokens[content].unique().numel() > 1 and torch.equal(random_a.tokens, random_b.tokens)
    with pytest.raises(ValueError, match="reasoning content must be one of"):
        model.set_reasoning_content("silent")


def test_content_control_on_a_checkpoint_reports_per_user_paired_differences(tmp_path):
    """run_depth_study.py --content_control: the checkpoint at its trained depth with generated, constant and random
    reasoning; the generated run reproduces the training run's valid result, the paired tests cover every user."""
    import json

    from recbole_reason import run_recbole_reason
    from recbole_reason.depth_study import content_control

    config_dict = {"data_path": DATA_PATH, **SMALL, "epochs": 1, "recpo_epochs": 0, "train_batch_size": 128,
                   "user_inter_num_interval": "[20,25]", "checkpoint_dir": str(tmp_path)}
    trained = run_recbole_reason("R2ec", "tiny", [TINY_CONFIG], config_dict, saved=True)
    result = content_control(trained["saved_model_file"], split="valid", metric="ndcg@10", out_dir=str(tmp_path / "c"))
    record = json.load(open(result["files"]["json"]))
    assert set(record["results"]) == {"generated", "constant", "random"} and set(record["paired"]) == {"constant", "random"}
    assert record["results"]["generated"] == pytest.approx(dict(trained["best_valid_result"]), abs=1e-4)
    assert all(test["n"] == 31 for test in record["paired"].values())  # the 31 users of the interval
    assert "| constant |" in open(result["files"]["md"]).read()
    assert (tmp_path / "c" / "reasoning_content_random.npz").is_file()


def test_reasoning_diversity_counts_the_distinct_greedy_reasonings(tiny_data):
    """`reasoning_diversity`: the users, distinct reasonings and the most common one's share of a loader, as greedy
    evaluation writes them; one string for everyone (a policy collapsed to `[ANS]`) gives 1 and 1.0."""
    from collections import Counter

    from recbole_reason.depth_study import reasoning_diversity
    from recbole_reason.model.r2ec_backbone import Reasoning

    # sampled reasoning (r2ec_eval_temperature 1), so that users differ; the same draws for both counts
    model, valid_data = _model(tiny_data, r2ec_eval_temperature=1.0), tiny_data[3]
    model.eval()
    generate = model.backbone.generate
    torch.manual_seed(0)
    with torch.no_grad():
        rows = [tuple(int(t) for t in row if int(t) != PAD) for batch in valid_data
                for row in generate(model.backbone.user_prompts(batch[0]), model.max_reason_len,
                                    model.eval_temperature, model.gen_top_k, model.gen_top_p).tokens]
    counts = Counter(rows)
    torch.manual_seed(0)
    stats = reasoning_diversity(model, valid_data)
    assert stats["users"] == len(rows) > 1 and stats["distinct"] == len(counts) > 1
    assert stats["top_share"] == counts.most_common(1)[0][1] / len(rows)
    assert stats["top"] == list(counts.most_common(1)[0][0]) and stats["top"][-1] == ANS

    def collapsed(prompt, *args):
        reasoning = generate(prompt, *args)
        tokens = torch.full_like(reasoning.tokens, PAD)
        tokens[:, 0] = ANS
        return Reasoning(tokens, torch.zeros_like(reasoning.sampled), reasoning.answer_states)

    model.backbone.generate = collapsed
    try:
        assert reasoning_diversity(model, valid_data) == {"users": len(rows), "distinct": 1, "top_share": 1.0, "top": [ANS]}
    finally:
        model.backbone.generate = generate


def test_recpo_item_loss_candidates_follow_recpo_item_candidates(warmed, tiny_data):
    """`recpo_item_candidates`: catalogue (default) and warmup (after the default catalogue warm-up) score every
    item, as the warm-up's softmax does; in_batch (the official code) the in-batch targets."""
    _, warm, _, train_data, _ = warmed
    assert _model(tiny_data, recpo_item_candidates="warmup").recpo_candidates == warm.warmup_candidates
    batch = next(iter(train_data))[:16]
    for source, expected in (("in_batch", torch.unique(batch["item_id"])), ("catalogue", torch.arange(1, warm.n_items)),
                             ("warmup", torch.arange(1, warm.n_items))):
        model = _recpo_copy(warm)
        model.recpo_candidates = warm.warmup_candidates if source == "warmup" else source
        model.refresh_item_table()
        seen = []
        encode = model.encode_items
        model.encode_items = lambda items: seen.append(items.clone()) or encode(items)
        (_, item_loss), _ = model.recpo_loss(batch)
        assert torch.equal(seen[-1], expected), source
        assert torch.isfinite(item_loss)


def test_recpo_item_trajectories_all_is_plain_ce_over_every_rollout(warmed, tiny_data):
    """`recpo_item_trajectories: all`: the item loss's gradient is that of the mean cross-entropy over all K rollouts
    of every user (the default), so no rollout is chosen with the target known; `relabelled` weights only the best one
    by its advantage, and its gradient differs."""
    import torch.nn.functional as F

    _, warm, _, train_data, _ = warmed
    assert _model(tiny_data).item_trajectories == "all"  # the default (docs/r2ec.md says why)
    batch = next(iter(train_data))[:16]
    targets = batch["item_id"].repeat_interleave(warm.group_size) - 1  # catalogue candidates are items 1..n-1
    grads = {}
    for kind in ("relabelled", "all"):
        model = _recpo_copy(warm)
        model.item_trajectories = kind
        model.refresh_item_table()
        states = []
        rec_head = model.rec_head
        model.rec_head = lambda h, e: (states.append((h, e)) or rec_head(h, e))
        torch.manual_seed(7)
        (_, item_loss), _ = model.recpo_loss(batch)
        h_u, cand = states[-1]  # the item loss's softmax (the reward's scores come first, from the no-grad table)
        grads[kind] = torch.autograd.grad(item_loss, h_u, retain_graph=True)[0]
        plain_ce = F.cross_entropy(rec_head(h_u, cand), targets)
        grads[kind + " ce"] = torch.autograd.grad(plain_ce, h_u)[0]
    assert torch.allclose(grads["all"], grads["all ce"], rtol=1e-4, atol=1e-7)
    assert (grads["all"].abs().sum(dim=1) > 0).all()  # every rollout gets a gradient
    assert not torch.allclose(grads["relabelled"], grads["relabelled ce"], rtol=1e-2, atol=1e-6)
    rows_used = (grads["relabelled"].abs().sum(dim=1) > 0).view(-1, warm.group_size).sum(dim=1)
    # r2ec_relabel_topk = 1: one rollout per user at most (none where a group's rollouts earn equal rewards: A = 0)
    assert (rows_used <= 1).all() and rows_used.sum() > len(rows_used) // 2, rows_used
