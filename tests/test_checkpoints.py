"""Checkpoints (issue 8): a checkpoint of another model, configuration or item ids is refused with a message naming
the difference; a reloaded model reproduces its test metrics; each RL stage clips gradients with its own setting;
NaN / inf in a loss, reward, advantage or gradient stops training naming it, and no checkpoint holds NaN weights."""

import math
import os

import pytest
import torch
from recbole.utils import init_seed
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import DATA_PATH, tiny_config
from recbole_reason.checkpoint import CheckpointMismatchError, differing_settings, first_non_finite, resume_state_file
from recbole_reason.compat import load_checkpoint
from recbole_reason.model import rl as rl_module
from recbole_reason.model.sequential_recommender import lares as lares_module
from recbole_reason.model.sequential_recommender import r2ec as r2ec_module
from recbole_reason.quick_start import _build, _train_and_test
from recbole_reason.trainer import reg4rec_trainer as reg4rec_trainer_module
from recbole_reason.trainer.base import parse_clip_grad_norm

SMALL = {
    "ReaRec": {"reason_step": 2},
    "SASRec": {},
    "LARES": {"n_pre_layers": 1, "n_core_layers": 1, "mean_recurrence": 2, "rl_epochs": 1, "rl_train_batch_size": 32,
              "group_num": 2, "filter_iters": 1, "filter_topk": 200, "depth_scaling_recurrences": []},
    "R2ec": {"inner_size": 32, "MAX_ITEM_LIST_LENGTH": 5, "r2ec_hist_tokens_per_item": 2, "r2ec_max_reason_len": 3,
             "r2ec_group_size": 2, "r2ec_lm_positions": 128, "recpo_epochs": 1},
    "REG4Rec": {"mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_epochs": 3, "mpq_hidden_dim": 32,
                "mpq_latent_dim": 8, "mpq_input_dim": 16, "d_model": 16, "n_enc_layers": 1, "n_dec_layers": 1,
                "ffn_dim": 32, "beam_size": 20, "beam_chunk_size": 64, "MAX_ITEM_LIST_LENGTH": 5,
                "corp_threshold": 0.75, "mpq_cf_epochs": 0, "item_feature_source": "features", "pars_group_size": 2,
                "msra_window": 2, "pars_epochs": 1},
}
RL = {"LARES": ("rpt", "rpt_clip_grad_norm"), "R2ec": ("recpo", "recpo_clip_grad_norm"),
      "REG4Rec": ("pars", "pars_clip_grad_norm")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_subset(folder, name, users=30, per_user=10, drop_items=()):
    """`name`: the first `per_user` interactions of the first `users` users of the tiny fixture (minus `drop_items`)."""
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    lines = open(os.path.join(DATA_PATH, "tiny", "tiny.inter")).read().splitlines()
    rows = {}
    for line in lines[1:]:
        if line.split("\t")[1] not in drop_items:
            rows.setdefault(line.split("\t")[0], []).append(line)
    kept = [row for user in list(rows)[:users] for row in sorted(rows[user], key=lambda r: float(r.split("\t")[3]))[:per_user]]
    items = {row.split("\t")[1] for row in kept}
    with open(os.path.join(folder, name, f"{name}.inter"), "w") as f:
        f.write("\n".join([lines[0], *kept]) + "\n")
    item_lines = open(os.path.join(DATA_PATH, "tiny", "tiny.item")).read().splitlines()
    with open(os.path.join(folder, name, f"{name}.item"), "w") as f:
        f.write("\n".join([item_lines[0], *(line for line in item_lines[1:] if line.split("\t")[0] in items)]) + "\n")
    return items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    items = write_subset(str(folder), "mini")
    other = tmp_path_factory.mktemp("other-items")
    write_subset(str(other), "mini", drop_items=set(sorted(items)[:5]))  # same name and settings, other item ids
    return {"data_path": str(folder), "other_items": str(other), "tokens": str(tmp_path_factory.mktemp("tokens"))}


def build(model, data, tmp_path, **overrides):
    config_dict = {"dataset": "mini", "data_path": data["data_path"], "checkpoint_dir": str(tmp_path / "saved"),
                   "epochs": 1, "train_batch_size": 64, "eval_batch_size": 256, **SMALL[model], **overrides}
    if model == "REG4Rec":
        config_dict.setdefault("tokenizer_cache_dir", data["tokens"])
    config = tiny_config(model, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    _, loaders, _, trainer = _build(config)
    return config, loaders, trainer


def saved_untrained(model, data, tmp_path, **overrides):
    """The checkpoint (and resume state) of an untrained model: the mismatch checks need no trained weights."""
    _, (train_data, _, _), trainer = build(model, data, tmp_path / "source", **overrides)
    trainer._note_items(train_data)
    trainer._save_checkpoint(0, verbose=False)
    trainer._write_resume_state(0, train_data, done=False, saved=True)
    return trainer.saved_model_file


# -- mismatches ---------------------------------------------------------------------------------------------
def test_checkpoint_of_another_model_is_refused(data, tmp_path):
    checkpoint = saved_untrained("SASRec", data, tmp_path)
    _, _, trainer = build("ReaRec", data, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"holds a SASRec model, not ReaRec: .*--model=SASRec"):
        trainer.load_model_weights(checkpoint)


def test_other_hidden_size_is_refused_naming_it_and_the_fix(data, tmp_path):
    checkpoint = saved_untrained("ReaRec", data, tmp_path)  # hidden_size 16 (tests/tiny.yaml)
    _, (_, _, test_data), trainer = build("ReaRec", data, tmp_path, hidden_size=32)
    message = rf"Checkpoint {checkpoint} was trained with other settings .*hidden_size=16 \(this run: 32\).*--hidden_size=16"
    with pytest.raises(CheckpointMismatchError, match=message):
        trainer.evaluate(test_data, load_best_model=True, model_file=checkpoint)
    for resume in (trainer.resume, trainer.resume_checkpoint):  # ours and RecBole's resume check the same
        with pytest.raises(CheckpointMismatchError, match=r"hidden_size=16 \(this run: 32\)"):
            resume(checkpoint)


def test_other_dataset_is_refused(data, tmp_path):
    checkpoint = saved_untrained("ReaRec", data, tmp_path)
    amazon = {"dataset": "tiny-amazon", "data_path": DATA_PATH, "RATING_FIELD": None,
              "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "attributes"]}}
    _, _, trainer = build("ReaRec", data, tmp_path, **amazon)
    with pytest.raises(CheckpointMismatchError, match=r"dataset='mini' \(this run: 'tiny-amazon'\)"):
        trainer.load_model_weights(checkpoint)


def test_other_reasoning_backbone_is_refused(data, tmp_path):
    checkpoint = saved_untrained("ReaRec", data, tmp_path, rearec_backbone="gru4rec")
    _, _, trainer = build("ReaRec", data, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"rearec_backbone='gru4rec' \(this run: 'sasrec'\).*--rearec_backbone='gru4rec'"):
        trainer.load_model_weights(checkpoint)


def test_llm_weight_settings_count_as_differences():
    saved = {"r2ec_lora_r": 4, "r2ec_lora_alpha": 128, "r2ec_lora_target_modules": "all-linear",
             "r2ec_hf_gguf_file": "a.gguf", "learning_rate": 1e-3}
    current = {"r2ec_lora_r": 8, "r2ec_lora_alpha": 128, "r2ec_lora_target_modules": ["q_proj"],
               "r2ec_hf_gguf_file": "b.gguf", "learning_rate": 1e-2}
    assert [key for key, _, _ in differing_settings(saved, current)] == [
        "r2ec_hf_gguf_file", "r2ec_lora_r", "r2ec_lora_target_modules"]  # not the learning rate


def test_other_number_of_codebooks_is_refused(data, tmp_path):
    checkpoint = saved_untrained("REG4Rec", data, tmp_path)
    _, _, trainer = build("REG4Rec", data, tmp_path, mpq_num_codebooks=4)
    with pytest.raises(CheckpointMismatchError, match=r"mpq_num_codebooks=3 \(this run: 4\).*--mpq_num_codebooks=3"):
        trainer.load_model_weights(checkpoint)


def test_other_item_ids_are_refused(data, tmp_path):
    """Same dataset name and settings, but its files lost five items: every item id shifts."""
    checkpoint = saved_untrained("ReaRec", data, tmp_path)
    _, (_, _, test_data), trainer = build("ReaRec", data, tmp_path, data_path=data["other_items"])
    with pytest.raises(CheckpointMismatchError, match="trained on other item ids than this run's 'mini' data"):
        trainer.evaluate(test_data, load_best_model=True, model_file=checkpoint)


def test_other_shapes_name_the_tensors_and_the_differing_settings(data, tmp_path):
    checkpoint = saved_untrained("ReaRec", data, tmp_path)  # reason_step 2: shapes the RPE table, not in the list
    _, _, trainer = build("ReaRec", data, tmp_path, reason_step=3)
    with pytest.raises(CheckpointMismatchError,
                       match=r"'reason_position_embedding' is \[2, 16\] in the checkpoint, \[3, 16\] here.*reason_step=2"):
        trainer.load_model_weights(checkpoint)


@pytest.mark.parametrize("model", ["SASRec", "ReaRec", "LARES", "R2ec", "REG4Rec"])
def test_reloaded_model_reproduces_its_test_metrics(model, data, tmp_path):
    config, loaders, trainer = build(model, data, tmp_path)
    result = _train_and_test(config, trainer, loaders, saved=True, verbose=False, show_progress=False)
    checkpoint = load_checkpoint(result["saved_model_file"])
    assert checkpoint["item_fingerprint"] and checkpoint["stage"] in {"supervised", "spt", "rpt", "warmup", "recpo", "pars"}
    _, (_, _, test_data), fresh = build(model, data, tmp_path / "fresh")
    assert dict(fresh.evaluate(test_data, load_best_model=True, model_file=result["saved_model_file"])) == dict(
        result["test_result"]
    )


# -- gradient clipping per RL stage --------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["LARES", "R2ec", "REG4Rec"])
def test_rl_stage_clips_with_its_own_setting(model, data, tmp_path, monkeypatch):
    """epochs 0: straight to the RL stage. Its clip setting is passed to clip_grad_norm_, the gradients it sees are
    bigger than the limit, and at every optimizer step of the stage the total norm is <= the limit."""
    import recbole.trainer.trainer as recbole_trainer

    stage, key = RL[model]
    max_norm = 1e-3
    config, (train_data, valid_data, _), trainer = build(model, data, tmp_path, epochs=0, **{key: max_norm})
    clips, norms = [], []
    clip = recbole_trainer.clip_grad_norm_

    def recorded_clip(parameters, **kwargs):
        total = clip(parameters, **kwargs)
        clips.append((trainer.stage, kwargs["max_norm"], float(total)))
        return total

    def measured(optimizer, args, kwargs):
        grads = [p.grad.detach().norm() for p in trainer.model.parameters() if p.grad is not None]
        norms.append((trainer.stage, torch.stack(grads).norm().item()))

    monkeypatch.setattr(recbole_trainer, "clip_grad_norm_", recorded_clip)
    hook = register_optimizer_step_pre_hook(measured)
    try:
        trainer.fit(train_data, valid_data, saved=True)
    finally:
        hook.remove()
    assert norms and {s for s, _ in norms} == {stage} and {s for s, _, _ in clips} == {stage}
    assert all(limit == max_norm for _, limit, _ in clips)
    assert max(before for *_, before in clips) > max_norm  # the clip had something to do
    assert max(norm for _, norm in norms) <= max_norm * (1 + 1e-4)
    assert trainer.last_grad_norm <= max_norm * (1 + 1e-4)


def test_clip_settings_parse_and_validate(data, tmp_path):
    assert parse_clip_grad_norm("rpt_clip_grad_norm", None) is None
    assert parse_clip_grad_norm("rpt_clip_grad_norm", 2) == {"max_norm": 2}
    assert parse_clip_grad_norm("k", {"max_norm": 1.0, "norm_type": 1}) == {"max_norm": 1.0, "norm_type": 1}
    for bad, message in ((0, "max_norm must be a number > 0"), ("big", r"must be null \(no clipping\), a number > 0"),
                         ({"max_norm": 1, "clip": 2}, "unknown option")):
        with pytest.raises(ValueError, match=message):
            parse_clip_grad_norm("recpo_clip_grad_norm", bad)
    # null: the RL stage inherits RecBole's clip_grad_norm; a value: its own
    _, _, inherits = build("R2ec", data, tmp_path, clip_grad_norm={"max_norm": 5.0}, recpo_clip_grad_norm=None)
    assert inherits.post_clip_grad_norm == {"max_norm": 5.0}
    with pytest.raises(ValueError, match="recpo_clip_grad_norm: max_norm must be a number > 0, got -1"):
        build("R2ec", data, tmp_path, recpo_clip_grad_norm=-1)


# -- NaN / inf ----------------------------------------------------------------------------------------------
def nan_like(function):
    return lambda *args, **kwargs: torch.full_like(function(*args, **kwargs), float("nan"))


ADVANTAGE_FUNCTIONS = ("group_relative_advantage", "recpo_group_advantages", "group_normalized_advantages",
                       "group_advantages")


def poison(monkeypatch, names, modules=(lares_module, r2ec_module, reg4rec_trainer_module, rl_module)):
    """Every function of these names, wherever the RL stages look it up, returns NaN."""
    for module in modules:
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, nan_like(getattr(module, name)))


@pytest.mark.parametrize("model, poisoned, name", [
    ("LARES", ADVANTAGE_FUNCTIONS, "advantage_abs_mean"),
    ("LARES", ("ranking_reward",), "reward"),
    ("R2ec", ADVANTAGE_FUNCTIONS, "advantage_abs_mean"),
    ("REG4Rec", ADVANTAGE_FUNCTIONS, "advantage_abs_mean"),
])
def test_nan_reward_or_advantage_stops_the_rl_stage_and_keeps_the_good_checkpoint(model, poisoned, name, data, tmp_path,
                                                                                  monkeypatch):
    stage = RL[model][0]
    _, (train_data, valid_data, _), trainer = build(model, data, tmp_path, epochs=0)
    poison(monkeypatch, poisoned)
    with pytest.raises(FloatingPointError, match=rf"^{stage} stage: '{name}' is nan at epoch 0, batch 0 \(step 0"):
        trainer.fit(train_data, valid_data, saved=True)
    good = load_checkpoint(trainer.saved_model_file)  # the supervised model, untouched by the failed step
    assert first_non_finite(good["state_dict"]) is None
    assert all(torch.equal(good["state_dict"][k], v) for k, v in trainer.model.state_dict().items())
    state = load_checkpoint(resume_state_file(trainer.saved_model_file))  # resumable from the RL stage's start
    assert state["stage"] == stage and first_non_finite(state["state_dict"]) is None


def test_nan_gradient_stops_before_the_step_naming_the_parameter(data, tmp_path):
    _, (train_data, valid_data, _), trainer = build("ReaRec", data, tmp_path)
    weights = trainer.model.item_embedding.weight
    before = weights.detach().clone()
    weights.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError,
                       match=r"supervised stage: the gradient of 'item_embedding.weight' is (nan|inf) at epoch 0, batch 0"):
        trainer.fit(train_data, valid_data, saved=True)
    assert torch.equal(weights.detach(), before)  # the optimizer never stepped
    assert not os.path.exists(trainer.saved_model_file)


def test_non_finite_weights_are_never_written(data, tmp_path):
    _, (train_data, _, _), trainer = build("ReaRec", data, tmp_path)
    trainer._save_checkpoint(0, verbose=False)
    good = load_checkpoint(trainer.saved_model_file)["state_dict"]
    with torch.no_grad():
        trainer.model.item_embedding.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weight 'item_embedding.weight' is NaN or inf after epoch 1"):
        trainer._save_checkpoint(1, verbose=False)
    with pytest.raises(FloatingPointError, match="resume.pth was not written"):
        trainer._write_resume_state(1, train_data, done=False, saved=True)
    kept = load_checkpoint(trainer.saved_model_file)["state_dict"]
    assert all(torch.equal(kept[k], v) for k, v in good.items())
    assert not os.path.exists(resume_state_file(trainer.saved_model_file))
    assert math.isfinite(float(kept["item_embedding.weight"][3, 0]))
