"""REG4Rec, issue 15: the design defects of the review, each as a test that fails on the code before the fix, and
learning tests of the two training stages on tiny data (supervised beats popularity; PARS raises its reward)."""

import copy

import pytest
import torch
from recbole.data import data_preparation

from conftest import DATA_PATH, tiny_config
from test_reg4rec import build as build_untrained
from recbole_reason import create_dataset
from recbole_reason.data import mpq_tokenizer as mpq
from recbole_reason.model.sequential_recommender.reg4rec import UNREACHED
from recbole_reason.trainer import reg4rec_trainer
from recbole_reason.trainer.reg4rec_trainer import REG4RecTrainer

SMALL = {
    "mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_epochs": 5, "mpq_hidden_dim": 32, "mpq_latent_dim": 8,
    "mpq_input_dim": 16, "mpq_cf_dim": 16, "d_model": 16, "n_heads": 2, "n_enc_layers": 1, "n_dec_layers": 1,
    "ffn_dim": 32, "beam_size": 20, "beam_chunk_size": 512, "MAX_ITEM_LIST_LENGTH": 5, "train_batch_size": 256,
    "corp_threshold": 0.75,  # corp rule with M = 3: two tokens always agree >= 0.5
}
AMAZON = {"dataset": "tiny-amazon", "RATING_FIELD": None,
          "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "attributes"]}}

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny tensors


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = tiny_config("REG4Rec", {"dataset": "tiny", "data_path": DATA_PATH,
                                     "checkpoint_dir": str(tmp_path_factory.mktemp("saved")), **SMALL})
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    tokens = mpq.build_item_tokens(config, train_data._dataset)
    train_data._dataset.attach_item_tokens(tokens)
    return config, train_data, valid_data, tokens


def build(data, steps=0, **overrides):
    """A REG4Rec on the tiny data after `steps` supervised Adam steps (so its logits are not those of the init)."""
    model, batch = build_untrained(data, **overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, batch


def pars_trainer(data, model, **overrides):
    config, train_data, _, _ = data
    saved = {key: config.final_config_dict.get(key) for key in overrides}
    config.final_config_dict.update(overrides)
    try:
        trainer = REG4RecTrainer(config, model)
    finally:
        config.final_config_dict.update(saved)
    trainer.stage = trainer.post_stage
    trainer.train_dataset = train_data._dataset
    trainer.reference_model = copy.deepcopy(model).eval()
    return trainer


# -- defect 1: item tokens ----------------------------------------------------------------------------------
def test_default_tokens_rarely_collide_on_tiny_amazon(tmp_path):
    """Attribute multi-hots make 85% of tiny-amazon's items collide before resolution; collaborative vectors don't."""
    config = tiny_config("REG4Rec", {**AMAZON, "data_path": DATA_PATH, "checkpoint_dir": str(tmp_path), **SMALL,
                                     "mpq_codebook_size": 32, "mpq_cf_epochs": 3})  # default source, test-sized
    train_data, _, _ = data_preparation(config, create_dataset(config))
    tokens = mpq.build_item_tokens(config, train_data._dataset)
    assert tokens.stats["collision_rate_before"] < 0.20, tokens.stats


def test_code_coherence_separates_semantic_from_arbitrary_codes():
    torch.manual_seed(0)
    centers = torch.randn(8, 6) * 4
    groups = torch.arange(160) % 8
    vectors = torch.cat([torch.zeros(1, 6), centers[groups] + 0.1 * torch.randn(160, 6)])
    semantic = torch.cat([torch.full((1, 2), -1), torch.stack([groups, groups], 1)])  # same group -> same codes
    arbitrary = torch.cat([torch.full((1, 2), -1), torch.randint(16, (160, 2))])
    assert mpq.code_coherence(semantic, vectors) == pytest.approx(1.0)
    assert mpq.code_coherence(arbitrary, vectors) < 0.3


# -- defect 2: PARS ratio ---------------------------------------------------------------------------------
def capture_ratio(monkeypatch):
    seen = {}
    original = reg4rec_trainer.clipped_policy_loss

    def spy(logp, old_logp, advantages, clip_eps=0.2):
        seen["ratio"] = torch.exp(logp - old_logp).detach()
        return original(logp, old_logp, advantages, clip_eps)

    monkeypatch.setattr(reg4rec_trainer, "clipped_policy_loss", spy)
    return seen


@pytest.mark.parametrize("refresh", ["epoch", "batch"])
def test_pars_ratio_is_one_at_identical_weights(data, monkeypatch, refresh):
    """pi_old = pi: the clipped ratio must be 1; dropout in the policy pass made its std ~0.13 before."""
    model, batch = build(data, steps=3, dropout=0.3)
    model.train()
    trainer = pars_trainer(data, model, pars_old_policy_refresh=refresh)
    trainer.old_model = copy.deepcopy(model).eval()  # a snapshot with the very same weights
    seen = capture_ratio(monkeypatch)
    torch.manual_seed(0)
    trainer.post_training_loss(batch)
    assert (seen["ratio"] - 1).abs().max() < 1e-5


# -- defect 4: CRSS order ---------------------------------------------------------------------------------
def test_beam_root_codebook_agrees_with_training_order(data, monkeypatch):
    """The codebook the beam emits first for a user is the one the training order starts with, for every sample."""
    model, batch = build(data, steps=5, dropout=0.3)
    sample = batch[:64]
    orders, choices = [], []
    crss_order, crss_choice = model.crss_order, model._crss_choice
    monkeypatch.setattr(model, "crss_order", lambda *a, **k: orders.append(crss_order(*a, **k)) or orders[-1])
    monkeypatch.setattr(model, "_crss_choice", lambda *a: choices.append(crss_choice(*a)) or choices[-1])
    model.train()
    model.calculate_loss(sample)  # the training order, in train mode (dropout on) as in fit
    model.eval()
    choices.clear()
    model.beam_search(sample[model.ITEM_SEQ], sample[model.ITEM_SEQ_LEN])
    root = choices[0][1]  # the first step's codebook per user (one beam per user at the root)
    assert root.shape == (64,)
    assert torch.equal(orders[0][:, 0], root)


# -- defect 5: CORP ---------------------------------------------------------------------------------------
def corp_buried_share(model, sample):
    """Share of the items the beam without CORP reaches for every user that CORP ranks below every item it left
    untouched (or pushes out of the beam), for every user (bench/reg4rec_diagnostic.py measures the same)."""
    seq, length = sample[model.ITEM_SEQ], sample[model.ITEM_SEQ_LEN]
    on = model.beam_search(seq, length)
    off = model.beam_search(seq, length, corp="off")
    reached_off, reached_on = off > UNREACHED / 2, on > UNREACHED / 2
    untouched = reached_on & ((on - off).abs() < 1e-4)
    floor = torch.where(untouched, on, torch.full_like(on, float("inf"))).min(1, keepdim=True).values
    buried = reached_off & (~reached_on | (on < floor))
    always_reached = reached_off.all(0)
    always_reached[0] = False
    assert always_reached.float().mean() > 0.9  # the wide beam reaches (nearly) every item for every user
    return float((buried.all(0) & always_reached).sum()) / float(always_reached.sum())


def test_corp_buries_no_item_for_every_user(data):
    """The old rule pruned the same self-inconsistent items for every user (2.1% of ml-100k's items last)."""
    model, batch = build(data, steps=5, beam_size=256)  # a wide beam reaches every item: only CORP can bury one
    model.eval()
    assert corp_buried_share(model, batch[:128]) == 0.0


# -- learning: supervised beats popularity; PARS raises its reward ----------------------------------------
def ndcg_at_10(scores, target, history):
    scores = scores.clone()
    scores.scatter_(1, history, float("-inf"))  # RecBole's full ranking excludes the history
    scores[:, 0] = float("-inf")
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)
    return float(torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2), torch.zeros_like(rank, dtype=torch.float)).mean())


def test_supervised_stage_beats_popularity(data):
    config, train_data, _, _ = data
    model, _ = build(data, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    batches = list(train_data)
    held_out, train_batches = batches[-1], batches[:-1]  # the last training batch is never trained on
    for _ in range(8):
        for batch in train_batches:
            loss = model.calculate_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    seq, length, target = held_out[model.ITEM_SEQ], held_out[model.ITEM_SEQ_LEN], held_out[model.POS_ITEM_ID]
    counts = torch.bincount(torch.cat([b[model.POS_ITEM_ID] for b in train_batches]), minlength=model.n_items).float()
    pop = ndcg_at_10(counts.expand(len(target), -1), target, seq)
    reg4rec = ndcg_at_10(model.full_sort_predict(held_out), target, seq)
    assert reg4rec > pop, (reg4rec, pop)


def mean_reward(model, trainer, batch, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        memory, padding = model.encode(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        paths, _, _ = model.sample_paths(memory, padding, 16)
        items = trainer.msra_targets(batch).repeat_interleave(16, 0)
        rewards, terms = reg4rec_trainer.msra_rewards(paths, model.item_vocab_tokens(items), model.item_cat[items],
                                                      model.token_cat, model.reward_weights, model.msra_gamma)
    return float(rewards.mean()), float(terms["global_path"].mean())


def test_pars_raises_its_reward(data):
    """GRPO steps on one batch raise the mean reward of fresh rollouts on that batch (same seeds before and after);
    the control (all advantages zero: only KL and SFT anchor act) does not raise it as much."""
    results = {}
    for name, advantage_scale in (("pars", 1.0), ("control", 0.0)):
        model, batch = build(data, steps=20, dropout=0.0)
        batch = batch[:64]
        trainer = pars_trainer(data, model, pars_sft_weight=0.0)
        model.eval()
        before = mean_reward(model, trainer, batch)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        original = reg4rec_trainer.group_normalized_advantages
        reg4rec_trainer.group_normalized_advantages = lambda r: original(r) * advantage_scale
        try:
            for step in range(15):
                torch.manual_seed(100 + step)
                loss = trainer.post_training_loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            reg4rec_trainer.group_normalized_advantages = original
        model.eval()
        after = mean_reward(model, trainer, batch)
        results[name] = (before, after)
    (before, after), (control_before, control_after) = results["pars"], results["control"]
    assert after[0] - before[0] > (control_after[0] - control_before[0]) + 0.005, results
