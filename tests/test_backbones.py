"""ReaRec on RecBole's other backbones (`rearec_backbone`): BERT4Rec under prefix masking and GRU4Rec.

For each: reason_step 0 is the plain RecBole model weight for weight; the reasoning tokens see only the past (and,
for BERT4Rec, the item tokens see each other); ERL and PRL train (the loss falls below popularity's); BERT4Rec's own
cloze objective equals RecBole's; bad settings fail before any work."""

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.gru4rec import GRU4Rec
from recbole.utils import init_seed

from conftest import DATA_PATH, tiny_config
from recbole_reason import create_dataset
from recbole_reason.model.layers import prefix_attention_bias
from recbole_reason.model.sequential_recommender.rearec import ReaRec

PLAIN = {"bert4rec": BERT4Rec, "gru4rec": GRU4Rec}


def _prepare(tmp_path_factory, **extra):
    config = tiny_config("ReaRec", {"dataset": "tiny", "data_path": DATA_PATH, "checkpoint_dir": str(tmp_path_factory.mktemp("saved")), **extra})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return config, train_data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, single_thread):
    config, train_data = _prepare(tmp_path_factory)
    return config, train_data._dataset, next(iter(train_data))


def build(tiny_data, model_class=ReaRec, **overrides):
    config, dataset, batch = tiny_data
    saved = {key: config.final_config_dict.get(key) for key in overrides}
    config.final_config_dict.update(overrides)
    try:
        init_seed(2020, True)
        model = model_class(config, dataset)
    finally:
        config.final_config_dict.update(saved)  # the config is shared by the module's tests
    return model, batch


def sequences(batch):
    return batch["item_id_list"], batch["item_length"]


@pytest.mark.parametrize("backbone", ["bert4rec", "gru4rec"])
def test_reason_step_zero_is_the_plain_recbole_backbone(tiny_data, backbone):
    """K = 0, tau = 1: RecBole's BERT4Rec / GRU4Rec state dict loads (only the RPE is missing) and gives the same
    full-ranking scores, pointwise scores and next-item CE."""
    # two layers: with one, the last position's output is the same under a causal and a bidirectional mask
    rearec, batch = build(tiny_data, rearec_backbone=backbone, reason_step=0, rearec_mode="erl", temperature=1.0,
                          n_layers=2, num_layers=2)
    plain, _ = build(tiny_data, model_class=PLAIN[backbone], n_layers=2, num_layers=2)
    missing, unexpected = rearec.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["reason_position_embedding"] and unexpected == []
    rearec.eval(), plain.eval()
    with torch.no_grad():
        scores = rearec.full_sort_predict(batch)
        plain_scores = plain.full_sort_predict(batch)
        assert scores.shape == plain_scores.shape == (len(batch), rearec.n_items)
        assert torch.allclose(scores, plain_scores, atol=1e-5)
        assert torch.allclose(rearec.predict(batch), plain.predict(batch), atol=1e-5)
        rec_loss, kl_term = rearec.calculate_loss(batch)
        assert torch.allclose(rec_loss, F.cross_entropy(plain_scores, batch["item_id"]), atol=1e-5)
        assert kl_term.item() == 0.0
        if backbone == "gru4rec":  # GRU4Rec's own CE loss
            assert torch.allclose(rec_loss, plain.calculate_loss(batch), atol=1e-5)
    reasoning, _ = build(tiny_data, rearec_backbone=backbone, reason_step=2, rearec_mode="prl", temperature=1.0,
                         n_layers=2, num_layers=2)
    reasoning.load_state_dict(plain.state_dict(), strict=False)
    reasoning.eval()
    with torch.no_grad():
        assert not torch.allclose(reasoning.full_sort_predict(batch), plain_scores, atol=1e-3)


def test_prefix_mask_bidirectional_among_items_causal_over_reasoning():
    valid = torch.tensor([[True, True, True, False, True, True]])  # 4 item slots (one padding), 2 reasoning tokens
    allowed = prefix_attention_bias(valid, 6, n_prefix=4)[0, 0] == 0
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],  # item tokens: every valid item, earlier or later, never a reasoning token
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 1, 0],  # reasoning token 1: the items and itself
        [1, 1, 1, 0, 1, 1],  # reasoning token 2: the items, token 1 and itself
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    # the cached step's one query row is the full mask's last row
    assert torch.equal(prefix_attention_bias(valid, 1, n_prefix=4)[0, 0, 0], prefix_attention_bias(valid, 6, 4)[0, 0, -1])


@pytest.mark.parametrize("backbone", ["bert4rec", "sasrec"])
def test_item_tokens_see_later_items_only_under_prefix_masking(tiny_data, backbone):
    """Prefix masking at work: BERT4Rec's output at the oldest position changes when the newest item changes;
    SASRec's causal output there (the control) does not."""
    model, batch = build(tiny_data, rearec_backbone=backbone, reason_step=1)
    model.eval()
    seq, length = sequences(batch)
    row = int((length >= 3).nonzero()[0])
    changed = seq.clone()
    changed[row, length[row] - 1] = (seq[row, length[row] - 1] % (model.n_items - 1)) + 1  # the newest real item
    valid = torch.arange(seq.size(1))[None, :] < length[:, None]
    with torch.no_grad():
        first = model.backbone._encode_items(model, seq, valid)[1][row, 0]
        first_changed = model.backbone._encode_items(model, changed, valid)[1][row, 0]
    assert torch.allclose(first, first_changed, atol=1e-5) == (backbone == "sasrec")


@pytest.mark.parametrize("backbone", ["bert4rec", "gru4rec"])
def test_reasoning_tokens_see_only_the_past(tiny_data, backbone):
    """Step k's state does not depend on later steps (r_0, r_1 equal at K = 1 and K = 3), the items' encoding does
    not depend on the reasoning tokens (KV cache = full re-encode of [items, reasoning tokens]), and garbage after
    the last real item changes nothing."""
    # two layers: the full re-encode's last output then depends on the items' outputs, which must not see the steps
    long, batch = build(tiny_data, rearec_backbone=backbone, reason_step=3, n_layers=2, num_layers=2)
    long.eval()
    seq, length = sequences(batch)
    with torch.no_grad():
        b = long.forward(seq, length)
        long.set_reasoning_depth(1)
        a = long.forward(seq, length)
        long.set_reasoning_depth(3)
        assert torch.allclose(a, b[:, :2], atol=1e-5)
        assert not torch.allclose(b[:, 1], b[:, 2], atol=1e-4)  # the steps do move the state
        padded = seq.clone()
        row = int((length < seq.size(1)).nonzero()[0])
        padded[row, length[row]:] = 7
        assert torch.allclose(long.forward(padded, length)[row], b[row], atol=1e-5)
    if backbone == "bert4rec":
        full, _ = build(tiny_data, rearec_backbone=backbone, reason_step=3, kv_cache=False, n_layers=2)
        full.load_state_dict(long.state_dict())
        full.eval()
        with torch.no_grad():
            assert torch.allclose(full.forward(seq, length), b, atol=1e-5)


@pytest.mark.parametrize("backbone", ["bert4rec", "gru4rec"])
def test_rcl_noise_only_on_reasoning_tokens(tiny_data, backbone):
    model, batch = build(tiny_data, rearec_backbone=backbone, rearec_mode="prl", reason_step=2, noise_std=0.5)
    model.eval()
    with torch.no_grad():
        clean, noisy = model.forward(*sequences(batch), noisy_view=True)
        plain = model.forward(*sequences(batch))
    assert torch.allclose(clean[:, 0], noisy[:, 0], atol=1e-6)
    assert not torch.allclose(clean[:, 1], noisy[:, 1], atol=1e-3)
    assert torch.allclose(plain, clean, atol=1e-5)


def batch_popularity_ce(target, n_items):
    """CE of ranking every item by its count among the batch's own targets: what learning popularity alone reaches."""
    counts = torch.bincount(target, minlength=n_items).float()
    return F.cross_entropy(torch.log(counts + 1e-9).expand(len(target), -1), target).item()


@pytest.mark.parametrize("backbone", ["bert4rec", "gru4rec"])
@pytest.mark.parametrize("mode", ["erl", "prl"])
def test_erl_and_prl_train_below_popularity(tiny_data, backbone, mode):
    """Every loss term runs; 25 Adam steps on one batch bring the recommendation CE well below its start and below
    the CE of ranking by the batch's own target popularity (a model that only learned popularity stays above it)."""
    model, batch = build(tiny_data, rearec_backbone=backbone, rearec_mode=mode, reason_step=2, warmup_epochs=0,
                         temperature=0.5)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = batch["item_id"]
    popularity_ce = batch_popularity_ce(target, model.n_items)
    rec_losses = []
    for _ in range(25):
        optimizer.zero_grad()
        terms = model.calculate_loss(batch)
        assert len(terms) == len(model.loss_names()) and all(torch.isfinite(t) for t in terms)
        sum(terms).backward()
        optimizer.step()
        rec_losses.append(terms[0].item())
    if mode == "prl":
        assert terms[2].item() > 0  # RCL is on (warm-up 0)
    assert rec_losses[-1] < 0.7 * rec_losses[0]
    assert rec_losses[-1] < popularity_ce
    assert model.reason_position_embedding.grad.abs().sum() > 0  # the reasoning steps are trained


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory, single_thread):
    config, train_data = _prepare(tmp_path_factory, transform="mask_itemseq", rearec_backbone="bert4rec",
                                  cloze_weight=0.5)
    return config, train_data._dataset, next(iter(train_data))


def test_cloze_term_is_bert4rec_objective(masked_data):
    """`cloze_weight` adds BERT4Rec's own masked-item loss: on the same weights and masked batch it equals RecBole's
    BERT4Rec.calculate_loss (CE), and it is logged as its own term."""
    rearec, batch = build(masked_data, reason_step=2, rearec_mode="prl", warmup_epochs=5)
    plain, _ = build(masked_data, model_class=BERT4Rec)
    rearec.load_state_dict(plain.state_dict(), strict=False)
    rearec.eval(), plain.eval()
    assert rearec.loss_names() == ("rec", "pta_steps", "rcl", "cloze")
    with torch.no_grad():
        terms = rearec.calculate_loss(batch)
        assert torch.allclose(terms[-1], 0.5 * plain.calculate_loss(batch), atol=1e-5)
        assert torch.allclose(rearec.cloze_loss(batch), plain.calculate_loss(batch), atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"rearec_backbone": "lightsans"}, r"rearec_backbone must be one of \('sasrec', 'bert4rec', 'gru4rec'\), got 'lightsans'"),
    ({"cloze_weight": 0.5}, r"cloze_weight > 0 is BERT4Rec's cloze objective: set rearec_backbone: bert4rec"),
    ({"cloze_weight": 0.5, "rearec_backbone": "bert4rec"}, r"set transform: mask_itemseq"),
    ({"rearec_backbone": "gru4rec", "num_layers": 0}, r"num_layers \(GRU layers of the gru4rec backbone\) must be an integer >= 1"),
])
def test_bad_backbone_settings_fail_with_one_line(tiny_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_data, **overrides)


# -- LARES's core block over RecBole's LightSANs layers (`lares_encoder: lightsans`) ----------------------------------
from recbole.model.sequential_recommender.lightsans import LightSANs  # noqa: E402
from recbole.model.sequential_recommender.sasrec import SASRec  # noqa: E402

from recbole_reason.model.sequential_recommender.lares import LARES  # noqa: E402

LARES_SMALL = {"n_pre_layers": 1, "n_core_layers": 1, "mean_recurrence": 2, "k_interests": 3}


@pytest.fixture(scope="module")
def lares_data(tmp_path_factory, single_thread):
    config = tiny_config("LARES", {"dataset": "tiny", "data_path": DATA_PATH,
                                   "checkpoint_dir": str(tmp_path_factory.mktemp("lares")), **LARES_SMALL})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    LARES(config, train_data._dataset)  # adds the row-index column TLA needs before the first batch is drawn
    return config, train_data._dataset, next(iter(train_data))


@pytest.mark.parametrize("encoder, plain_class", [("transformer", SASRec), ("lightsans", LightSANs)])
def test_lares_one_zero_step_is_the_plain_stacked_backbone(lares_data, encoder, plain_class):
    """LARES at T = 1 from a zero state with the add adapter is the plain backbone with n_pre + n_core layers, on the
    same weights, while LN2 is the identity on H (H is the pre-block's post-LN output: true at initialisation; a
    trained pre-block LayerNorm with other weight/bias is not undone by LN2, hence "not weight for weight" in
    general). The plain model's layers 0..n_pre-1 are the pre-block, the rest the core block."""
    lares, batch = build(lares_data, model_class=LARES, lares_encoder=encoder, state_init_method="zero", test_recurrence=1)
    plain, _ = build(lares_data, model_class=plain_class, n_layers=2, attn_dropout_prob=0.5)  # LARES ties it (null)
    state = plain.state_dict()
    mapped = {}
    for key, value in state.items():
        if key.startswith("trm_encoder.layer.0."):
            mapped[key.replace("trm_encoder.layer.0.", "pre_encoder.layer.0.")] = value
        elif key.startswith("trm_encoder.layer.1."):
            mapped[key.replace("trm_encoder.layer.1.", "core_encoder.layer.0.")] = value
        else:
            mapped[key.replace("LayerNorm.", "input_layer_norm.")] = value
    missing, unexpected = lares.load_state_dict(mapped, strict=False)
    assert missing == ["core_layer_norm.weight", "core_layer_norm.bias"] and unexpected == []
    lares.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(lares.full_sort_predict(batch), plain.full_sort_predict(batch), atol=1e-4)
        assert not torch.allclose(lares.forward(*sequences(batch), n_steps=3), lares.forward(*sequences(batch), n_steps=1),
                                  atol=1e-3)  # more core steps do change the readout


def test_lares_lightsans_core_is_shared_and_spt_trains(lares_data):
    """The LightSANs blocks are RecBole's, the core block is looped with shared weights, and SPT (CE + TLA + SLA)
    runs and, in 30 Adam steps on one batch, lowers its CE by a quarter and below popularity's (the SASRec core
    does the same at this size: 6.91 -> 4.58)."""
    from recbole.model.layers import LightTransformerEncoder

    model, batch = build(lares_data, model_class=LARES, lares_encoder="lightsans", sampling_scheme="constant",
                         hidden_dropout_prob=0.1)
    assert isinstance(model.core_encoder, LightTransformerEncoder) and isinstance(model.pre_encoder, LightTransformerEncoder)
    calls = []
    model.core_encoder.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = batch["item_id"]
    popularity_ce = batch_popularity_ce(target, model.n_items)
    ce = []
    for _ in range(30):
        optimizer.zero_grad()
        terms = model.calculate_loss(batch)
        assert all(torch.isfinite(t) for t in terms) and terms[1].item() > 0 and terms[2].item() > 0
        sum(terms).backward()
        optimizer.step()
        ce.append(terms[0].item())
    assert len(calls) == 30 * 3 * 2  # 3 forward passes per SPT batch, each 2 core steps (constant depth r = 2)
    assert ce[-1] < 0.75 * ce[0] and ce[-1] < popularity_ce


def test_lares_bad_encoder_fails_with_one_line(lares_data):
    with pytest.raises(ValueError, match=r"lares_encoder must be one of \['transformer', 'lightsans'\], got 'fmlp'"):
        build(lares_data, model_class=LARES, lares_encoder="fmlp")
