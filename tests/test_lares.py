"""LARES (arXiv 2505.16865): architecture, SPT losses, RPT math, trainer stages, depth scaling, config errors."""

import copy
import math
import os
import time

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_reason.config import Config, properties_dir
from recbole_reason.model.sequential_recommender import lares as lares_module
from recbole_reason.model.sequential_recommender.lares import (
    LARES,
    ROW_INDEX_FIELD,
    SameTargetPositives,
    group_relative_advantage,
    grpo_per_step_loss,
    ranking_reward,
    symmetric_info_nce,
)
from recbole_reason.quick_start import _build, run_recbole_reason
from recbole_reason.trainer import lares_trainer as lares_trainer_module
from recbole_reason.trainer.lares_trainer import LARESTrainer
from recbole_reason.utils import create_dataset

from conftest import DATA_PATH, TINY_CONFIG

SMALL = {"n_pre_layers": 1, "n_core_layers": 1, "mean_recurrence": 2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hidden size 16 gains nothing from intra-op threads, and two threads per process oversubscribe the shared
    2-core CI box (measured: the end-to-end test took 5x the CPU time). Restored for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny dataset and config shared by the unit tests; models are rebuilt per test with overrides."""
    folder = tmp_path_factory.mktemp("lares")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["pytest"])
        config = Config(
            model="LARES",
            config_file_list=[TINY_CONFIG],
            config_dict={"dataset": "tiny", "data_path": DATA_PATH, "checkpoint_dir": str(folder / "saved"), **SMALL},
        )
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    LARES(config, train_data._dataset)  # as in quick_start, the model is built before the first batch is drawn
    batch = next(iter(train_data))  # one fixed batch: the shuffled loader gives a new one on every pass
    return config, train_data, valid_data, test_data, batch


def make_model(built, **overrides):
    config = built[0]
    previous = {key: config[key] for key in overrides}
    try:
        for key, value in overrides.items():
            config[key] = value
        init_seed(config["seed"], True)
        return LARES(config, built[1]._dataset)
    finally:
        for key, value in previous.items():
            config[key] = value


def first_batch(built):
    return built[4]


# ---------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------
def test_causality_future_item_cannot_change_earlier_positions(built):
    model = make_model(built).eval()
    seq = torch.randint(1, model.n_items, (3, model.max_seq_length))
    length = torch.full((3,), model.max_seq_length)
    noise = model.initial_state(torch.zeros(3, model.max_seq_length, model.hidden_size))
    assert noise.abs().sum() > 0  # `normal` init: the noise path is part of the check
    changed = seq.clone()
    p = 4
    changed[:, p + 1 :] = torch.randint(1, model.n_items, changed[:, p + 1 :].shape)
    with torch.no_grad():
        state, _ = model.reason(seq, length, 3, initial_state=noise)
        state_changed, _ = model.reason(changed, length, 3, initial_state=noise)
    assert torch.allclose(state[:, : p + 1], state_changed[:, : p + 1], atol=1e-6)
    assert not torch.allclose(state[:, p + 1 :], state_changed[:, p + 1 :], atol=1e-3)  # the test can fail


def test_one_zero_step_with_add_is_a_stacked_sasrec(built):
    """Spec check: T = 1, zero init, add => pre-block, then (0 + H)/2, LN2, core block."""
    model = make_model(built, state_init_method="zero", hidden_dropout_prob=0.0).eval()
    batch = first_batch(built)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        pos = model.position_embedding(torch.arange(seq.size(1)))
        x = model.input_layer_norm(model.item_embedding(seq) + pos)
        mask = model.get_attention_mask(seq)
        h = model.pre_encoder(x, mask)[-1]
        expected = model.core_encoder(model.core_layer_norm(h / 2), mask)[-1]
        expected = expected[torch.arange(len(seq)), length - 1]
        got = model.forward(seq, length, n_steps=1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_pre_block_runs_once_and_shared_core_refines_every_position(built):
    model = make_model(built).train()
    calls = {"pre": 0, "core": 0}
    model.pre_encoder.register_forward_hook(lambda *a: calls.__setitem__("pre", calls["pre"] + 1))
    model.core_encoder.register_forward_hook(lambda *a: calls.__setitem__("core", calls["core"] + 1))
    seq = torch.randint(1, model.n_items, (2, model.max_seq_length))
    length = torch.full((2,), model.max_seq_length)
    states = []
    model.core_encoder.register_forward_hook(lambda module, inputs, output: states.append(output[-1].detach()))
    model.reason(seq, length, 5)
    assert calls == {"pre": 1, "core": 5}
    # every step changes every position, with the same core weights
    for before, after in zip(states, states[1:]):
        assert ((after - before).abs().amax(-1) > 1e-4).all()


def test_without_pre_block_the_input_itself_is_reinjected(built):
    """n_pre_layers: 0 is the paper's "w/o pre-block" ablation."""
    model = make_model(built, n_pre_layers=0, state_init_method="zero", hidden_dropout_prob=0.0).eval()
    assert model.pre_encoder is None
    seq = torch.randint(1, model.n_items, (2, 10))
    length = torch.full((2,), 10)
    with torch.no_grad():
        x = model.input_layer_norm(model.item_embedding(seq) + model.position_embedding(torch.arange(10)))
        expected = model.core_encoder(model.core_layer_norm(x / 2), model.get_attention_mask(seq))[-1]
        state, _ = model.reason(seq, length, 1)
    assert torch.allclose(state, expected, atol=1e-5)


def test_adapters_reinject_the_pre_block_output(built):
    s, h = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    assert torch.allclose(make_model(built, adapter_type="add").reinject(s, h), (s + h) / 2)
    linear = make_model(built, adapter_type="linear")
    assert torch.allclose(linear.reinject(s, h), (s + h) / 2)  # sigma(0) = 1/2 at init
    with torch.no_grad():
        linear.adapter_logit.fill_(2.0)
    w = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(linear.reinject(s, h), w * s + (1 - w) * h)
    concat = make_model(built, adapter_type="concat")
    assert torch.allclose(concat.reinject(s, h), concat.adapter(torch.cat([s, h], -1)))
    assert concat.adapter.in_features == 32 and "adapter.weight" in concat.state_dict()


def test_state_init_modes(built):
    like = torch.zeros(64, 10, 16)
    normal = make_model(built, state_init_method="normal", state_std=1.0, state_scale=3.0)
    for mode in (True, False):
        s0 = normal.train(mode).initial_state(like)
        assert s0.std() > 1.5 and s0.abs().max() <= 9.0 + 1e-5  # 3 * z, z cut at 3 std
    # eval noise is reseeded on every eval(): same weights => same evaluation
    first = normal.eval().initial_state(like)
    assert torch.equal(first, normal.eval().initial_state(like))
    normal_zero = make_model(built, state_init_method="normal_zero")
    assert normal_zero.train().initial_state(like).abs().sum() > 0
    assert normal_zero.eval().initial_state(like).abs().sum() == 0
    zero = make_model(built, state_init_method="zero")
    assert zero.train().initial_state(like).abs().sum() == 0 and zero.eval().initial_state(like).abs().sum() == 0


def test_depth_sampling_schemes_and_fixed_test_depth(built):
    torch.manual_seed(0)
    r = 4

    def draws(scheme):
        model = make_model(built, sampling_scheme=scheme, mean_recurrence=r, test_recurrence=None)
        return torch.tensor([model.sample_train_depth() for _ in range(2000)], dtype=torch.float)

    plog = draws("poisson-lognormal")
    assert plog.min() >= 1 and plog.max() <= 3 * r and abs(plog.mean() - (r + 1)) < 0.4  # E[T] ~ r + 1
    uniform = draws("uniform")
    assert uniform.min() == 1 and uniform.max() == 2 * r
    unbounded, bounded = draws("poisson-unbounded"), draws("poisson-bounded")
    assert unbounded.min() >= 1 and abs(unbounded.mean() - r) < 0.3 and bounded.max() <= 2 * r
    assert set(draws("non-recurrent").tolist()) == {1.0} and set(draws("constant").tolist()) == {float(r)}

    model = make_model(built, test_recurrence=6)
    seq = torch.randint(1, model.n_items, (2, 10))
    length = torch.full((2,), 10)
    model.eval()
    with torch.no_grad():
        depths = {model.reason(seq, length, model.current_depth())[1].size(1) for _ in range(5)}
    assert depths == {6}


def test_readout_is_last_real_position_scored_against_tied_table(built):
    model = make_model(built).eval()
    batch = first_batch(built)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    assert (length < seq.size(1)).any()  # some right padding
    with torch.no_grad():
        state, readouts = model.reason(seq, length, 4)
        assert torch.allclose(readouts[:, -1], state[torch.arange(len(seq)), length - 1])
        model.train(False)
        scores = model.full_sort_predict(batch)
        model.train(False)
        output = model.forward(seq, length)
    assert scores.shape == (len(seq), model.n_items)
    assert torch.allclose(scores, output @ model.item_embedding.weight.t(), atol=1e-5)
    cos = make_model(built, sem_func="cos", tau=0.5)
    out = torch.randn(3, 16)
    table = torch.nn.functional.normalize(cos.item_embedding.weight, dim=-1)
    expected = torch.nn.functional.normalize(out, dim=-1) @ table.t() / 0.5
    assert torch.allclose(cos.item_scores(out), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SPT
# ---------------------------------------------------------------------------------------------------------------
def test_tla_positives_share_the_target_and_come_from_the_training_split(built):
    model = make_model(built)
    train = built[1]._dataset
    targets = train.inter_feat[model.POS_ITEM_ID]
    assert len(model.positives.order) == len(train)  # training rows only
    rows = torch.arange(len(train))
    partners = model.positives.partners(rows)
    assert torch.equal(targets[partners], targets)
    counts = torch.bincount(targets)
    shared = counts[targets] > 1
    assert (partners[shared] != rows[shared]).all() and (partners[~shared] == rows[~shared]).all()
    # the batch path: sequences of the partner rows
    batch = first_batch(built)
    seq, length = model.same_target_sequences(batch)
    partner = model.positives.partners(batch[ROW_INDEX_FIELD])
    assert seq.shape == batch[model.ITEM_SEQ].shape and torch.equal(targets[partner], batch[model.POS_ITEM_ID])
    # built once, then cached on disk
    assert make_model(built).positives.loaded_from_cache


def test_same_target_index_is_a_group_by_not_a_quadratic_loop(tmp_path):
    targets = torch.randint(1, 20000, (300_000,))
    start = time.time()
    no_sequences = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    index = SameTargetPositives(targets, *no_sequences, str(tmp_path))
    assert time.time() - start < 5
    partners = index.partners(torch.arange(0, 300_000, 7))
    assert torch.equal(targets[partners], targets[torch.arange(0, 300_000, 7)])


def test_info_nce_is_symmetric_in_batch():
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    logits = x @ y.t() / 0.5
    nce = torch.nn.functional.cross_entropy
    expected = 0.5 * (nce(logits, torch.arange(5)) + nce(logits.t(), torch.arange(5)))
    assert torch.allclose(symmetric_info_nce(x, y, 0.5, "dot"), expected)
    assert torch.allclose(symmetric_info_nce(x, y, 1.0, "cos"), symmetric_info_nce(3 * x, y, 1.0, "cos"))


def _deterministic_spt_model(built, monkeypatch, depths, j, **overrides):
    """Dropout 0 and zero init: every forward is deterministic, so the loss terms can be recomputed by hand."""
    model = make_model(built, hidden_dropout_prob=0.0, state_init_method="zero", **overrides).train()
    depth_iter = iter(depths)
    monkeypatch.setattr(model, "sample_train_depth", lambda: next(depth_iter))
    real_randint = torch.randint
    def randint(low, high, size, **kwargs):  # the SLA step j is the only scalar draw
        return torch.tensor(j) if size == () else real_randint(low, high, size, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    return model


def test_sla_aligns_an_intermediate_step_with_the_final_one(built, monkeypatch):
    model = _deterministic_spt_model(built, monkeypatch, depths=[2, 3], j=0, alpha=0.0, gamma=1.0)
    batch = first_batch(built)
    rec, tla, sla = model.calculate_loss(batch)
    _, trajectory = model.reason(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], 3)
    u = trajectory[:, -1]
    assert tla == 0
    assert not torch.allclose(trajectory[:, 0], u, atol=1e-2)  # step 0 really is an intermediate state
    assert torch.allclose(sla, symmetric_info_nce(u, trajectory[:, 0], model.tau, model.sem_func), atol=1e-6)
    assert (sla - symmetric_info_nce(u, u, model.tau, model.sem_func)).abs() > 1e-5
    # CE at the first depth draw
    output = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], n_steps=2)
    expected_rec = torch.nn.functional.cross_entropy(model.item_scores(output), batch[model.POS_ITEM_ID])
    assert torch.allclose(rec, expected_rec, atol=1e-5)


def test_sla_is_skipped_at_depth_one(built, monkeypatch):
    model = _deterministic_spt_model(built, monkeypatch, depths=[2, 1], j=0, alpha=0.0, gamma=1.0)
    _, _, sla = model.calculate_loss(first_batch(built))
    assert sla == 0


def test_tla_uses_same_target_partner_at_the_same_depth(built, monkeypatch):
    model = _deterministic_spt_model(built, monkeypatch, depths=[2, 3], j=0, alpha=1.0, gamma=0.0)
    batch = first_batch(built)
    torch.manual_seed(5)
    _, tla, sla = model.calculate_loss(batch)
    torch.manual_seed(5)
    positive_seq, positive_len = model.same_target_sequences(batch)
    _, trajectory = model.reason(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], 3)
    _, positive_trajectory = model.reason(positive_seq, positive_len, 3)
    assert sla == 0
    expected = symmetric_info_nce(trajectory[:, -1], positive_trajectory[:, -1], model.tau, model.sem_func)
    assert torch.allclose(tla, expected, atol=1e-5)


@pytest.mark.parametrize("alpha,gamma,passes", [(0.0, 0.0, 1), (0.0, 0.5, 2), (0.1, 0.0, 3), (0.1, 0.5, 3)])
def test_each_spt_loss_term_switches_off(built, alpha, gamma, passes):
    model = make_model(built, alpha=alpha, gamma=gamma, sampling_scheme="constant", mean_recurrence=3).train()
    calls = []
    model.pre_encoder.register_forward_hook(lambda *a: calls.append(1))
    rec, tla, sla = model.calculate_loss(first_batch(built))
    assert len(calls) == passes  # an off term costs no forward pass
    assert (tla != 0) == (alpha > 0) and (sla != 0) == (gamma > 0) and rec > 0


def test_same_seed_same_spt_loss(built):
    losses = []
    for _ in range(2):
        model = make_model(built).train()
        torch.manual_seed(3)
        losses.append(torch.stack(model.calculate_loss(first_batch(built))))
    assert torch.equal(losses[0], losses[1])


# ---------------------------------------------------------------------------------------------------------------
# RPT
# ---------------------------------------------------------------------------------------------------------------
def test_group_advantages_sum_to_zero_and_vanish_for_equal_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.1, 0.5]])
    advantages = group_relative_advantage(rewards)
    assert torch.allclose(advantages.sum(1), torch.zeros(4), atol=1e-5)
    assert torch.equal(advantages[1:3], torch.zeros(2, 4))
    expected = (rewards[0] - 0.5) / (rewards[0].std(unbiased=True) + 1e-4)
    assert torch.allclose(advantages[0], expected)


def test_rpt_gradient_is_minus_advantage_times_grad_logp_over_valid_steps():
    torch.manual_seed(0)
    B, G, T = 3, 4, 5
    logp = torch.randn(B, G, T, requires_grad=True)
    advantages = torch.randn(B, G)
    depths = torch.tensor([[1, 5, 3, 2]] * B)
    mask = (torch.arange(T) < depths.unsqueeze(-1)).float()
    loss, _ = grpo_per_step_loss(logp, logp.detach() + 0.3, advantages, 0.0, mask)
    loss.backward()
    expected = -advantages.unsqueeze(-1) * mask / depths.unsqueeze(-1) / (B * G)
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    # with beta > 0 the KL term pulls towards the reference, and is zero where policy == reference
    loss_same, kl_same = grpo_per_step_loss(logp.detach(), logp.detach(), advantages, 1.0, mask)
    assert kl_same == 0
    _, kl_far = grpo_per_step_loss(logp.detach(), logp.detach() + 0.3, advantages, 1.0, mask)
    assert kl_far > 0


def test_ranking_rewards():
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0], [9.0, 1.0, 2.0, 3.0, 4.0]])
    target = torch.tensor([2, 1])  # ranks 1 and 3 (padding column 0 never ranks)
    assert torch.equal(ranking_reward(scores, target, "recall", 2), torch.tensor([1.0, 0.0]))
    ndcg = ranking_reward(scores, target, "ndcg", 10)
    assert torch.allclose(ndcg, torch.tensor([1 / math.log2(3), 1 / math.log2(5)]))


def test_kl_is_zero_before_the_first_update(built):
    model = make_model(built, hidden_dropout_prob=0.0, state_init_method="zero", group_num=3).train()
    reference = copy.deepcopy(model).eval()
    loss, stats = model.reinforcement_post_training_loss(first_batch(built), reference)
    assert stats["kl"] == 0 and torch.isfinite(loss)
    assert 0 <= stats["reward"] <= 1 and 1 <= stats["depth"]
    # with noise and dropout the policy's rollouts differ from the reference: the KL is positive (test can fail)
    noisy = make_model(built, group_num=3).train()
    _, noisy_stats = noisy.reinforcement_post_training_loss(first_batch(built), copy.deepcopy(noisy).eval())
    assert noisy_stats["kl"] > 0


def test_rpt_beta_zero_switches_the_kl_term_off(built):
    batch = first_batch(built)
    losses = {}
    for beta in (0.0, 1.0):
        model = make_model(built, beta=beta, group_num=2, sampling_scheme="constant").train()
        reference = copy.deepcopy(model).eval()
        torch.manual_seed(1)
        losses[beta], stats = model.reinforcement_post_training_loss(batch, reference)
    # same rollouts (same seed), so the two losses differ by exactly beta * mean KL
    assert not torch.allclose(losses[0.0], losses[1.0])
    assert torch.allclose(losses[1.0] - losses[0.0], torch.tensor(stats["kl"]), atol=1e-5)


def test_top_k_filter_keeps_rows_whose_target_ranks_in_the_top_k(built):
    model = make_model(built, state_init_method="normal_zero")  # noise-free eval: the ranks can be recomputed
    trainer = LARESTrainer(built[0], model)
    dataset = built[1]._dataset
    trainer.filter_topk, trainer.filter_iters = model.n_items, 1
    assert trainer.top_k_filter(dataset).all()
    trainer.filter_topk = 5
    keep = trainer.top_k_filter(dataset)
    model.eval()
    rank = model.target_rank(dataset.inter_feat[torch.arange(len(dataset))])
    assert torch.equal(keep, rank < 5) and 0 < keep.sum() < len(dataset)


# ---------------------------------------------------------------------------------------------------------------
# Trainer, end to end
# ---------------------------------------------------------------------------------------------------------------
class _Scalars:
    def __init__(self):
        self.tags = {}

    def add_scalar(self, tag, value, step):
        self.tags[(tag, step)] = value


def test_spt_then_rpt_end_to_end_with_checkpoint_reload(tiny, monkeypatch):
    captured = {}
    original = LARESTrainer.post_evaluate

    def spy(self, test_data):
        self.tensorboard = _Scalars()
        captured["trainer"] = self
        return original(self, test_data)

    monkeypatch.setattr(LARESTrainer, "post_evaluate", spy)
    config_dict = tiny(
        **SMALL, sampling_scheme="constant", train_batch_size=512, rl_epochs=1, rl_train_batch_size=128, group_num=2,
        filter_iters=1, depth_scaling_recurrences=[1, 3],
    )
    result = run_recbole_reason("LARES", config_file_list=[TINY_CONFIG], config_dict=config_dict)
    trainer = captured["trainer"]
    assert set(trainer.stage_results) == {"spt", "rpt"} and trainer.rpt_rows_kept > 0
    assert len(trainer.rpt_train_data._dataset) == trainer.rpt_rows_kept
    assert trainer.rpt_train_data.step == 128
    assert set(result["depth_results"]) == {1, 3}
    assert ("depth/ndcg@10", 3) in trainer.tensorboard.tags

    # the checkpoint holds the best model (no reference copy inside) and reproduces the test result on reload
    checkpoint = torch.load(result["saved_model_file"], weights_only=False)
    assert not any("reference" in key for key in checkpoint["state_dict"])
    config = Config(model="LARES", config_file_list=[TINY_CONFIG], config_dict=config_dict)
    init_seed(config["seed"], True)
    _, (_, _, test_data), _, fresh_trainer = _build(config)
    reloaded = fresh_trainer.evaluate(test_data, load_best_model=True, model_file=result["saved_model_file"])
    assert dict(reloaded) == dict(result["test_result"])


def test_rl_epochs_zero_is_spt_only(tiny, monkeypatch):
    # epochs: 0 keeps the check cheap: the stage logic, not the training, is under test
    config = Config(model="LARES", config_file_list=[TINY_CONFIG], config_dict=tiny(**SMALL, rl_epochs=0, epochs=0))
    init_seed(config["seed"], True)
    _, (train_data, valid_data, test_data), model, trainer = _build(config)
    monkeypatch.setattr(trainer, "start_post_training", lambda data: pytest.fail("RPT must not start"))
    trainer.fit(train_data, valid_data, saved=True)
    assert set(trainer.stage_results) == {"spt"} and trainer.reference_model is None
    assert trainer.stage == "spt"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value",
    [
        ("mean_recurrence", 0),
        ("sampling_scheme", "geometric"),
        ("state_init_method", "uniform"),
        ("adapter_type", "gate"),
        ("test_recurrence", 0),
        ("n_core_layers", 0),
        ("alpha", -0.1),
        ("tau", 0.0),
        ("sem_func", "l2"),
        ("group_num", 1),
        ("reward_metric", "MRR"),
        ("state_std", 0.0),
    ],
)
def test_bad_model_settings_raise_a_clear_error(built, key, value):
    with pytest.raises(ValueError, match=key):
        make_model(built, **{key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("filter_topk", 0),
        ("filter_iters", 0),
        ("rl_dropout_prob", 1.5),
        ("depth_scaling_recurrences", [1, 0]),
        ("rl_epochs", -1),
    ],
)
def test_bad_trainer_settings_raise_a_clear_error(built, key, value):
    config = built[0]
    previous = config[key]
    config[key] = value
    try:
        with pytest.raises(ValueError, match=key):
            LARESTrainer(config, make_model(built))
    finally:
        config[key] = previous


def test_every_yaml_key_is_documented_and_read():
    path = os.path.join(properties_dir(), "model", "LARES.yaml")
    keys = []
    with open(path) as handle:
        for line in handle:
            if line.strip() and not line.startswith("#"):
                keys.append(line.split(":")[0])
                assert "#" in line, f"undocumented key in LARES.yaml: {line.strip()}"
    sources = open(lares_module.__file__).read() + open(lares_trainer_module.__file__).read()
    # read by RecBole or the shared PostTrainingTrainer, not by LARES's own files
    recbole_keys = {"loss_type", "train_batch_size", "rl_epochs", "rl_learning_rate", "rpt_clip_grad_norm"}
    for key in keys:
        assert f'config["{key}"]' in sources or key in recbole_keys, f"{key} is never read"
