"""ReaRec: reasoning steps, KV cache, ERL and PRL terms, RCL noise and warm-up, reduction to SASRec."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed

from conftest import TINY_CONFIG
from recbole_reason import Config, create_dataset
from recbole_reason.model.sequential_recommender.rearec import ReaRec


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import DATA_PATH

    config = Config(model="ReaRec", dataset="tiny", config_file_list=[TINY_CONFIG],
                    config_dict={"data_path": DATA_PATH, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    batch = next(iter(train_data))
    return config, train_data._dataset, batch


def build(tiny_data, model_class=ReaRec, **overrides):
    config, dataset, batch = tiny_data
    saved = {key: config.final_config_dict.get(key) for key in overrides}
    config.final_config_dict.update(overrides)
    init_seed(2020, True)
    model = model_class(config, dataset)
    config.final_config_dict.update(saved)  # the config is shared by the module's tests
    return model, batch


def test_forward_returns_one_state_per_step(tiny_data):
    model, batch = build(tiny_data, reason_step=3)
    states = model.forward(batch["item_id_list"], batch["item_length"])
    assert states.shape == (len(batch), 4, model.hidden_size)


def test_kv_cache_equals_full_reencode(tiny_data):
    cached, batch = build(tiny_data, reason_step=3, kv_cache=True)
    full, _ = build(tiny_data, reason_step=3, kv_cache=False)
    full.load_state_dict(cached.state_dict())
    cached.eval(), full.eval()
    with torch.no_grad():
        a = cached.forward(batch["item_id_list"], batch["item_length"])
        b = full.forward(batch["item_id_list"], batch["item_length"])
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a[:, 1], a[:, 2])  # the steps do move the state


def test_reasoning_tokens_never_see_padding_or_future(tiny_data):
    model, batch = build(tiny_data, reason_step=2)
    model.eval()
    seq, length = batch["item_id_list"].clone(), batch["item_length"]
    with torch.no_grad():
        before = model.forward(seq, length)
        padded = seq.clone()
        row = int((length < seq.size(1)).nonzero()[0])
        padded[row, length[row]:] = 7  # garbage after the last real item
        after = model.forward(padded, length)
    assert torch.allclose(before[row], after[row], atol=1e-5)


def test_reason_step_zero_is_sasrec(tiny_data):
    """K = 0 (with the same input dropout as SASRec) is SASRec: same weights give the same output and CE loss."""
    config = tiny_data[0]
    rearec, batch = build(tiny_data, reason_step=0, rearec_mode="erl", temperature=1.0,
                          input_dropout_prob=config["hidden_dropout_prob"])
    sasrec, _ = build(tiny_data, model_class=SASRec)
    missing, unexpected = rearec.load_state_dict(sasrec.state_dict(), strict=False)
    assert missing == ["reason_position_embedding"] and unexpected == []
    rearec.eval(), sasrec.eval()
    with torch.no_grad():
        r = rearec.forward(batch["item_id_list"], batch["item_length"])[:, 0]
        s = sasrec.forward(batch["item_id_list"], batch["item_length"])
        rec_loss, kl_term = rearec.calculate_loss(batch)
        assert torch.allclose(r, s, atol=1e-5)
        assert torch.allclose(rec_loss, sasrec.calculate_loss(batch), atol=1e-5)
        assert kl_term.item() == 0.0  # no pairs of steps with K = 0


def test_erl_loss_is_pooled_ce_minus_weighted_pairwise_kl(tiny_data):
    model, batch = build(tiny_data, rearec_mode="erl", reason_step=2, kl_weight=0.05)
    model.eval()
    with torch.no_grad():
        rec_loss, kl_term = model.calculate_loss(batch)
        states = model.forward(batch["item_id_list"], batch["item_length"])
        logits = states @ model.item_embedding.weight.t() / model.temperature
        pooled = states.mean(1) @ model.item_embedding.weight.t() / model.temperature
        expected_ce = F.cross_entropy(pooled, batch["item_id"])
        p = logits.softmax(-1)
        kls = [F.kl_div(p[:, i].log(), p[:, j], reduction="batchmean") for i, j in itertools.permutations(range(3), 2)]
        expected_kl = torch.stack(kls).mean()
    assert torch.allclose(rec_loss, expected_ce, atol=1e-5)
    assert torch.allclose(kl_term, -0.05 * expected_kl, atol=1e-6)
    assert kl_term.item() < 0  # diversity is rewarded


def test_erl_kl_gradient_flows_only_through_the_later_distribution(tiny_data):
    model, batch = build(tiny_data, rearec_mode="erl", reason_step=1, kl_weight=1.0)
    model.eval()
    _, kl_term = model.calculate_loss(batch)
    kl_term.backward()
    assert model.reason_position_embedding.grad.abs().sum() > 0  # diversity pushes the reasoning step


def test_prl_terms_pta_and_rcl_after_warmup(tiny_data):
    model, batch = build(tiny_data, rearec_mode="prl", reason_step=2, warmup_epochs=2, temp_decay=5.0)
    model.eval()
    model.set_epoch(0)
    with torch.no_grad():
        main, steps, rcl = model.calculate_loss(batch)
        states = model.forward(batch["item_id_list"], batch["item_length"])
        E, tau = model.item_embedding.weight, model.temperature
        expected_main = F.cross_entropy(states[:, 2] @ E.t() / tau, batch["item_id"])
        expected_steps = (F.cross_entropy(states[:, 0] @ E.t() / (tau * 25), batch["item_id"])
                          + F.cross_entropy(states[:, 1] @ E.t() / (tau * 5), batch["item_id"])) / 2
    assert torch.allclose(main, expected_main, atol=1e-5)
    assert torch.allclose(steps, expected_steps, atol=1e-5)
    assert rcl.item() == 0.0  # warm-up: no RCL in epochs 0 and 1
    model.set_epoch(2)
    with torch.no_grad():
        _, _, rcl = model.calculate_loss(batch)
    assert rcl.item() > 0


def test_pta_sum_reduction_is_the_paper_form(tiny_data):
    mean_model, batch = build(tiny_data, rearec_mode="prl", reason_step=2, pl_reduction="mean")
    sum_model, _ = build(tiny_data, rearec_mode="prl", reason_step=2, pl_reduction="sum")
    sum_model.load_state_dict(mean_model.state_dict())
    mean_model.eval(), sum_model.eval()
    with torch.no_grad():
        assert torch.allclose(sum_model.calculate_loss(batch)[1], 2 * mean_model.calculate_loss(batch)[1], atol=1e-5)


def test_rcl_noise_only_on_reasoning_tokens(tiny_data):
    model, batch = build(tiny_data, rearec_mode="prl", reason_step=2, noise_std=0.5)
    model.eval()  # no dropout: the two views differ by the noise alone
    with torch.no_grad():
        clean, noisy = model.forward(batch["item_id_list"], batch["item_length"], noisy_view=True)
    assert torch.allclose(clean[:, 0], noisy[:, 0], atol=1e-6)  # item tokens: no noise
    assert not torch.allclose(clean[:, 1], noisy[:, 1], atol=1e-3)  # reasoning tokens: noise
    with torch.no_grad():
        plain = model.forward(batch["item_id_list"], batch["item_length"])
    assert torch.allclose(plain, clean, atol=1e-5)  # inference never adds noise


def test_naive_feedback_ignores_rpe(tiny_data):
    model, batch = build(tiny_data, rearec_mode="naive", reason_step=2)
    model.eval()
    with torch.no_grad():
        before = model.forward(batch["item_id_list"], batch["item_length"])
        model.reason_position_embedding.add_(1.0)
        after = model.forward(batch["item_id_list"], batch["item_length"])
    assert torch.allclose(before, after)


@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_training_lowers_the_loss(tiny_data, mode):
    model, batch = build(tiny_data, rearec_mode=mode, reason_step=2, warmup_epochs=0, temperature=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = sum(model.calculate_loss(batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_predict_matches_full_sort(tiny_data):
    for mode in ("erl", "prl"):
        model, batch = build(tiny_data, rearec_mode=mode, reason_step=2)
        model.eval()
        with torch.no_grad():
            scores = model.full_sort_predict(batch)
            pointwise = model.predict(batch)
        assert scores.shape == (len(batch), model.n_items)
        assert torch.allclose(scores.gather(1, batch["item_id"].unsqueeze(1)).squeeze(1), pointwise, atol=1e-4)


def test_non_finite_loss_term_stops_training_with_its_name(tiny):
    """A NaN in one loss term stops training at once, naming the term, the stage, epoch and batch."""
    from recbole.data import data_preparation as prepare

    from recbole_reason import get_trainer

    config = Config(model="ReaRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict=tiny(rearec_mode="erl"))
    train_data, valid_data, _ = prepare(config, create_dataset(config))
    model = ReaRec(config, train_data._dataset)
    real_loss = model.calculate_loss
    model.calculate_loss = lambda interaction: (real_loss(interaction)[0], torch.tensor(float("nan")))
    trainer = get_trainer(model.type, "ReaRec")(config, model)
    with pytest.raises(FloatingPointError, match=r"supervised stage: loss term 'kl_diversity' is nan at epoch 0, batch 0"):
        trainer.fit(train_data, valid_data, saved=True)
