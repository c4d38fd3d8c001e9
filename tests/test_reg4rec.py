"""REG4Rec: MPQ tokenizer (losses, collisions, cache), CRSS, constrained decoding, CORP, PARS/MSRA rewards, end to end."""

import os

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from conftest import DATA_PATH, TINY_CONFIG, tiny_config
from recbole_reason import Config, create_dataset, run_recbole_reason
from recbole_reason.compat import load_checkpoint
from recbole_reason.data import mpq_tokenizer as mpq
from recbole_reason.data.reg4rec_dataset import TARGET_POS_FIELD
from recbole_reason.model.sequential_recommender.reg4rec import (
    PRUNED_OFFSET,
    REG4Rec,
    UNREACHED,
    combined_reward,
    corp_consistency,
    msra_rewards,
    pars_rewards,
)

SMALL = {
    "mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_epochs": 5, "mpq_hidden_dim": 32, "mpq_latent_dim": 8,
    "mpq_input_dim": 16, "d_model": 16, "n_heads": 2, "n_enc_layers": 1, "n_dec_layers": 1, "ffn_dim": 32,
    "beam_size": 20, "beam_chunk_size": 64, "MAX_ITEM_LIST_LENGTH": 5, "corp_threshold": 0.75,
}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny tensors


def tok(r, j, D=100):
    """vocab id of codeword j of codebook r (D = 100 in the hand-made examples)."""
    return 4 + r * D + j


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    config = tiny_config("REG4Rec", {"dataset": "tiny", "data_path": DATA_PATH,
                                     "checkpoint_dir": str(tmp_path_factory.mktemp("saved")), **SMALL})
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    tokens = mpq.build_item_tokens(config, train_data._dataset)
    train_data._dataset.attach_item_tokens(tokens)
    return config, train_data, (valid_data, test_data), tokens


def build(tiny_data, **overrides):
    config, train_data, _, tokens = tiny_data
    saved = {key: config.final_config_dict.get(key) for key in overrides}
    config.final_config_dict.update(overrides)
    try:
        init_seed(2020, True)
        model = REG4Rec(config, train_data._dataset)
    finally:
        config.final_config_dict.update(saved)
    model.set_item_tokens(tokens)
    return model, next(iter(train_data))


# -- MPQ tokenizer ------------------------------------------------------------------------------------------
def settings(**overrides):
    values = dict(num_codebooks=3, codebook_size=8, max_codebooks=8, latent_dim=4, hidden_dim=16, input_dim=8, epochs=15,
                  learning_rate=3e-3, batch_size=64, beta=0.25, lambda_vq=1.0, lambda_orth=0.1, lambda_bal=0.01,
                  feature_source="features", cf_epochs=0, cf_dim=8, cf_patience=0, cf_layers=1, cf_learning_rate=1e-3, n_pseudo_cat=4, category_field=None, seed=0)
    values.update(overrides)
    s = mpq.TokenizerSettings(**values)
    s.validate()
    return s


def test_mpq_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    centers = torch.randn(6, 8) * 3
    vectors = torch.cat([torch.zeros(1, 8), centers[torch.randint(6, (120,))] + 0.3 * torch.randn(120, 8)])
    model, history = mpq.train_mpq(vectors, settings())
    assert history[-1] < 0.7 * history[0]
    _, untrained_history = mpq.train_mpq(vectors, settings(epochs=0))
    assert untrained_history[-1] == pytest.approx(untrained_history[0])  # no training, no improvement
    e = model.encode(vectors[1:])
    assert mpq.expert_orthogonality(e) >= 0 and model.quantize(vectors[1:]).shape == (120, 3)


def test_orthogonality_term_is_zero_for_orthogonal_experts_only():
    orthogonal = torch.eye(3).unsqueeze(0).repeat(5, 1, 1)  # expert r's output = e_r
    assert mpq.expert_orthogonality(orthogonal) == 0
    assert mpq.expert_orthogonality(torch.ones(5, 3, 3)) == pytest.approx(6.0)  # 3*2 off-diagonal pairs of cosine 1


def test_collision_resolution_is_injective_and_reported():
    torch.manual_seed(0)
    distances = torch.rand(40, 2, 8)
    distances[10:20] = distances[10]  # ten items with identical vectors collide on every codebook
    nearest = distances.argmin(-1)
    assert mpq.collision_rate(nearest) > 0.2
    codes = mpq.resolve_collisions(distances)
    assert mpq.collision_rate(codes) == 0.0
    assert len({tuple(row) for row in codes.tolist()}) == 40
    untouched = [i for i in range(40) if i not in range(11, 20)]
    keepers = [i for i in untouched if sum(tuple(nearest[i].tolist()) == tuple(nearest[j].tolist()) for j in range(40)) == 1]
    assert all(codes[i].tolist() == nearest[i].tolist() for i in keepers)  # items without collision keep their codes
    with pytest.raises(ValueError, match="cannot identify"):
        mpq.resolve_collisions(torch.rand(70, 2, 8))  # 8**2 = 64 tuples < 70 items


def test_tokenizer_output_on_tiny_is_injective(tiny_data):
    _, _, _, tokens = tiny_data
    table = tokens.item2tokens
    assert (table[0] == -1).all() and (table[1:] >= 0).all()
    assert len(tokens.tuple_to_item()) == table.size(0) - 1
    assert tokens.stats["collision_rate_after"] == 0.0 and 0 <= tokens.stats["collision_rate_before"] < 1
    assert len(tokens.stats["code_usage"]) == 3 and tokens.stats["category_source"] == "field:class"
    assert tokens.token_cat.shape == (3, 16)


def test_cache_is_reused_and_invalidated(tiny_data, tmp_path):
    config, train_data, _, first = tiny_data
    dataset = train_data._dataset
    config.final_config_dict["tokenizer_cache_dir"] = str(tmp_path)
    try:
        built = mpq.build_item_tokens(config, dataset)
        assert not built.from_cache and os.path.dirname(built.cache_file) == str(tmp_path)
        assert torch.equal(built.item2tokens, first.item2tokens)  # seeded: same tokens wherever they are built
        mtime = os.path.getmtime(built.cache_file)
        reused = mpq.build_item_tokens(config, dataset)
        assert reused.from_cache and reused.cache_file == built.cache_file and os.path.getmtime(built.cache_file) == mtime
        # other tokenizer settings -> another cache key
        config.final_config_dict["mpq_epochs"] = 3
        other = mpq.build_item_tokens(config, dataset)
        assert not other.from_cache and other.cache_file != built.cache_file
        config.final_config_dict["mpq_epochs"] = SMALL["mpq_epochs"]
        # a cache written for other data (fingerprint mismatch) is stale and rebuilt
        cached = load_checkpoint(built.cache_file)
        cached["fingerprint"] = "another dataset"
        torch.save(cached, built.cache_file)
        rebuilt = mpq.build_item_tokens(config, dataset)
        assert not rebuilt.from_cache and torch.equal(rebuilt.item2tokens, built.item2tokens)
        assert load_checkpoint(built.cache_file)["fingerprint"] == mpq.dataset_fingerprint(dataset)
    finally:
        config.final_config_dict["tokenizer_cache_dir"] = None
        config.final_config_dict["mpq_epochs"] = SMALL["mpq_epochs"]


# -- dataset / MSRA leakage ---------------------------------------------------------------------------------
def test_msra_futures_are_training_interactions_only(tiny_data):
    _, train_data, (valid_data, test_data), _ = tiny_data
    dataset, valid, test = train_data._dataset, valid_data._dataset, test_data._dataset
    inter = dataset.inter_feat
    users, pos = inter["user_id"], inter[TARGET_POS_FIELD].long()
    future = dataset.future_items(users, pos, 3)
    valid_pos = {int(u): int(p) for u, p in zip(valid.inter_feat["user_id"], valid.inter_feat[TARGET_POS_FIELD])}
    test_positions = {int(u): int(p) for u, p in zip(test.inter_feat["user_id"], test.inter_feat[TARGET_POS_FIELD])}
    for row in range(len(users)):
        u = int(users[row])
        for k in range(3):
            p = int(pos[row]) + k + 1
            if p in (valid_pos[u], test_positions[u]):
                assert future[row, k] == 0  # never a validation or test item
            elif future[row, k] > 0:
                assert future[row, k] == dataset.full_sequences[u, p]
    # the last training target of each user has no future at all; earlier ones have the next training item
    last = {}
    for row in range(len(users)):
        last[int(users[row])] = max(last.get(int(users[row]), -1), int(pos[row]))
    rows_last = [r for r in range(len(users)) if int(pos[r]) == last[int(users[r])]]
    assert (future[rows_last] == 0).all()
    assert (future[:, 0] > 0).float().mean() > 0.8


# -- rewards (the [FIG] examples) ---------------------------------------------------------------------------
def test_pars_rewards_on_figure_examples():
    target = torch.tensor([[tok(0, 1), tok(1, 2), tok(2, 3)]]).repeat(4, 1)
    paths = torch.tensor([
        [tok(0, 1), tok(1, 20), tok(2, 3)],   # step-hit 2
        [tok(0, 10), tok(1, 2), tok(2, 30)],  # step-hit 1
        [tok(1, 2), tok(2, 3), tok(0, 1)],    # the target in another order: global path 1
        [tok(0, 20), tok(1, 20), tok(2, 20)],  # nothing
    ])
    token_cat = torch.zeros(4 + 300, dtype=torch.long)
    token_cat[[tok(0, 1), tok(1, 20)]] = 30
    token_cat[[tok(2, 3), tok(0, 10), tok(2, 30)]] = 27
    token_cat[tok(1, 2)] = 30
    target_cat = torch.full((4,), 27)
    terms = pars_rewards(paths, target, token_cat, target_cat)
    assert terms["step_hit"].tolist() == [2, 1, 3, 0]
    assert terms["global_path"].tolist() == [0, 0, 1, 0]
    # cats: <30,30,27> -> 1 hit; <27,30,27> -> 2; <30,27,30> -> 1; <0,0,0> -> 0
    assert terms["category_hit"].tolist() == [1, 2, 1, 0]
    # consistency: <30,30,27> -> 1; <27,30,27> -> 0; <30,27,30> -> 0; unknown categories never agree
    assert terms["step_consistency"].tolist() == [1, 0, 0, 0]
    total = combined_reward(terms, [1.0, 1.0, 0.5, 0.5], 3)
    assert total[2] == pytest.approx(1 + 1 + 0.5 * 1 / 3 + 0)
    assert total[3] == 0


def test_msra_rewards_decay_and_renormalise():
    paths = torch.tensor([[tok(0, 1), tok(1, 1)], [tok(0, 1), tok(1, 1)]])
    hit, miss, pad = [tok(0, 1), tok(1, 1)], [tok(0, 5), tok(1, 5)], [0, 0]
    futures = torch.tensor([[miss, hit, pad], [miss, pad, pad]])
    token_cat = torch.zeros(204, dtype=torch.long)
    weights = [1.0, 1.0, 0.0, 0.0]
    total, first = msra_rewards(paths, futures, torch.zeros(2, 3, dtype=torch.long), token_cat, weights, gamma=0.5)
    # row 0: target missed, next item fully hit (reward 2) with weight 0.5 -> (0 * 1 + 2 * 0.5) / 1.5
    assert total[0] == pytest.approx(2 * 0.5 / 1.5)
    assert total[1] == 0 and first["step_hit"].tolist() == [0, 0]
    only_target, _ = msra_rewards(paths, futures[:, :1], torch.zeros(2, 1, dtype=torch.long), token_cat, weights, 0.5)
    assert only_target.tolist() == [0, 0]  # window 1 = plain PARS against the target


# -- CRSS, decoding, CORP -----------------------------------------------------------------------------------
def fixed_logits(model, preferred):
    """next_token_logits that always prefers `preferred` vocab ids (descending), ignoring the context."""
    table = torch.zeros(model.vocab_size)
    for rank, token in enumerate(preferred):
        table[token] = 10.0 - rank
    return lambda decoder_input, memory, padding, last_only=False: table.expand(
        decoder_input.size(0), 1 if last_only else decoder_input.size(1), -1).clone()


def fixed_beam_logits(model, preferred):
    step = fixed_logits(model, preferred)
    return lambda prefixes, memory, padding: step(prefixes.flatten(0, 1), None, None, True).view(*prefixes.shape[:2], -1)


def test_grouped_beam_decoding_equals_separate_sequences(tiny_data):
    model, batch = build(tiny_data)
    model.eval()
    memory, padding = model.encode(batch["item_id_list"][:3], batch["item_length"][:3])
    prefixes = torch.randint(4, model.vocab_size, (3, 5, 3))
    prefixes[:, :, 0] = 1
    grouped = model.beam_logits(prefixes, memory, padding)
    separate = model.next_token_logits(prefixes.flatten(0, 1), memory.repeat_interleave(5, 0), padding.repeat_interleave(5, 0))
    assert torch.allclose(grouped, separate[:, -1].view(3, 5, -1), atol=1e-5)


def test_crss_emits_the_most_confident_codebook_first(tiny_data):
    model, batch = build(tiny_data)
    target_items = batch["item_id"][:4]
    target = model.item_vocab_tokens(target_items)
    model.next_token_logits = fixed_logits(model, [target[0, 2], target[0, 0], target[0, 1]])
    memory, padding = model.encode(batch["item_id_list"][:4], batch["item_length"][:4])
    model.crss_mode = "confidence"  # the paper's literal rule (the default, decoding: tests/test_reg4rec_fixes.py)
    assert model.crss_order(memory, padding, target)[0].tolist() == [2, 0, 1]
    model.crss_mode = "fixed"
    assert model.crss_order(memory, padding, target)[0].tolist() == [0, 1, 2]
    model.crss_mode = "random"
    orders = model.crss_order(memory, padding, target.repeat(8, 1))
    assert all(sorted(o) == [0, 1, 2] for o in orders.tolist()) and len({tuple(o) for o in orders.tolist()}) > 1


def test_supervised_loss_trains(tiny_data):
    model, batch = build(tiny_data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_generated_paths_decode_only_to_real_items(tiny_data):
    model, batch = build(tiny_data)
    model.eval()
    real = set(range(1, model.n_items))
    tuples = {tuple(row): item for item, row in enumerate(model.item2tokens.tolist()) if item > 0}
    memory, padding = model.encode(batch["item_id_list"][:16], batch["item_length"][:16])
    paths, masks, logp = model.sample_paths(memory, padding, 4)
    items = model.path_items(paths)
    assert (items > 0).all() and set(items.tolist()) <= real
    for path, item in zip(paths.tolist(), items.tolist()):
        local = [None] * model.M
        for token in path:
            local[(token - 4) // model.D] = (token - 4) % model.D
        assert tuples[tuple(local)] == item  # one token per codebook, and the tuple is exactly that item's
    assert torch.isfinite(logp).all() and masks.gather(2, paths.unsqueeze(-1)).all()
    scores = model.full_sort_predict(batch[:16])
    assert scores.shape == (16, model.n_items)
    reached = scores > UNREACHED
    assert not reached[:, 0].any() and (reached.sum(1) >= model.beam_size).all()
    assert torch.isfinite(scores).all()


def test_corp_consistency_scores():
    cats = torch.tensor([[5, 5, 7], [5, 7, 9], [0, 0, 0], [0, 4, 4]])
    cons = corp_consistency(cats)
    assert cons.tolist() == pytest.approx([2 / 3, 1 / 3, 1.0, 1.0])
    assert (cons >= 0.5).tolist() == [True, False, True, True]  # keeps the consistent path, drops the inconsistent


def test_corp_prunes_an_inconsistent_path_in_beam_search(tiny_data):
    model, batch = build(tiny_data, beam_size=20)
    model.eval()
    x = 7
    x_tokens = model.item_vocab_tokens(torch.tensor(x)).tolist()
    others = [t for t in range(4, model.vocab_size) if t not in x_tokens]
    model.beam_logits = fixed_beam_logits(model, x_tokens + others)  # the model wants item x above all
    model.token_cat.fill_(1)
    seq, length = batch["item_id_list"][:4], batch["item_length"][:4]
    without = model.beam_search(seq, length, corp="off")
    assert (without.argmax(1) == x).all()
    # x's tokens now evoke three different categories: the path to x is inconsistent (1/3 < 0.75) after 2 tokens
    model.token_cat[x_tokens[0]], model.token_cat[x_tokens[1]], model.token_cat[x_tokens[2]] = 2, 3, 4
    with_corp = model.beam_search(seq, length, corp="rule")
    surviving = with_corp > -PRUNED_OFFSET / 2
    assert (with_corp[:, x] < -PRUNED_OFFSET / 2).all() and (surviving.sum(1) >= 10).all()
    assert (with_corp.argmax(1) != x).all()
    # a consistent version of the same path is kept
    model.token_cat[x_tokens[0]] = model.token_cat[x_tokens[1]] = 3
    assert (model.beam_search(seq, length, corp="rule").argmax(1) == x).all()


# -- configuration errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"mpq_codebook_size": 1}, "mpq_codebook_size must be >= 2"),
    ({"mpq_num_codebooks": 9, "mpq_max_codebooks": 8}, "mpq_num_codebooks must be between 2 and mpq_max_codebooks=8"),
    ({"beam_size": 5}, "beam_size must be >="),
    ({"corp_step": 3}, "corp_step must be between 1"),
    ({"crss_mode": "sorted"}, "crss_mode must be one of"),
    ({"pars_reward_weights": [1, 1]}, "pars_reward_weights must be 4"),
])
def test_bad_settings_raise_clear_errors(tiny_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_data, **overrides)


def test_no_features_and_no_pretrained_model_is_an_error(tiny):
    config_dict = tiny(**{**SMALL, "dataset": "tiny-amazon", "RATING_FIELD": None, "mpq_cf_epochs": 0,
                          "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    config = Config(model="REG4Rec", config_file_list=[TINY_CONFIG], config_dict=config_dict)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    with pytest.raises(ValueError, match="no item features and mpq_cf_epochs is 0"):
        mpq.build_item_tokens(config, train_data._dataset)
    config.final_config_dict["item_feature_source"] = "features"
    with pytest.raises(ValueError, match="needs item features"):
        mpq.build_item_tokens(config, train_data._dataset)
    # without a category field, categories are k-means clusters of the item vectors
    dataset = train_data._dataset
    torch.manual_seed(0)
    cats, source = mpq.item_category_ids(dataset, torch.randn(dataset.item_num, 4), settings(n_pseudo_cat=5))
    assert source == "kmeans:5" and cats[0] == 0 and set(cats[1:].tolist()) <= {1, 2, 3, 4, 5} and len(set(cats.tolist())) > 2


# -- end to end -------------------------------------------------------------------------------------------
def test_end_to_end_tokenizer_sft_pars_msra_and_checkpoint_reload(tiny):
    config_dict = tiny(**{**SMALL, "dataset": "tiny-amazon", "RATING_FIELD": None, "item_feature_source": "features+cf",
                          "mpq_cf_epochs": 1, "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "attributes"]},
                          "mpq_codebook_size": 32, "encoder_token_level": False, "train_batch_size": 1024, "pars_epochs": 1,
                          "pars_group_size": 2, "msra_window": 2, "epochs": 1,
                          "pars_context_ratio": 0.5})
    result = run_recbole_reason("REG4Rec", config_file_list=[TINY_CONFIG], config_dict=config_dict)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    checkpoint = load_checkpoint(result["saved_model_file"])
    config = checkpoint["config"]
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    model = REG4Rec(config, train_data._dataset)
    assert not bool(model.tokens_ready)
    model.load_state_dict(checkpoint["state_dict"])
    assert bool(model.tokens_ready) and (model.item2tokens[1:] >= 0).all()
    model.eval()
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), model.n_items) and (scores > UNREACHED).sum(1).min() >= 20
    cache = os.path.join(config["checkpoint_dir"], "reg4rec_tokens")
    assert len(os.listdir(cache)) == 1  # the tokenizer table is cached next to the checkpoint
