"""Reasoning-depth study and stage-tagged logging: every model's depth knob, the study end to end on trained
checkpoints, the table and figure, and the TensorBoard tags of a multi-stage run."""

import glob
import os
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import run_depth_study
from conftest import DATA_PATH, TINY_CONFIG, tiny_config
from recbole_reason import create_dataset, get_model, run_recbole_reason
from recbole_reason.compare import cli_config_overrides
from recbole_reason.data import mpq_tokenizer as mpq
from recbole_reason.depth_study import apply_evaluation_settings, depth_study
from recbole_reason.figures import depth_figure
from recbole_reason.model.sequential_recommender.lares import LARES
from recbole_reason.model.sequential_recommender.r2ec import ANS, R2ec
from recbole_reason.model.sequential_recommender.rearec import ReaRec
from recbole_reason.model.sequential_recommender.reg4rec import UNREACHED, REG4Rec
from recbole_reason.trainer.lares_trainer import LARESTrainer
from recbole_reason.trainer.r2ec_trainer import R2ecTrainer

FAST = {"train_batch_size": 1024, "MAX_ITEM_LIST_LENGTH": 5}


def _scalars(log_dir):
    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


# -- each model's depth knob: validation on the real methods ---------------------------------------------------------
def test_depth_knobs_validate_and_return_the_previous_depth():
    rearec = SimpleNamespace(reason_step=2, reason_position_embedding=torch.zeros(2, 4))
    assert ReaRec.set_reasoning_depth(rearec, 5) == 2 and rearec.reason_step == 5  # beyond K: allowed
    assert ReaRec.set_reasoning_depth(rearec, 0) == 5 and rearec.reason_step == 0  # backbone only
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reason_step"):
            ReaRec.set_reasoning_depth(rearec, bad)
    with pytest.raises(ValueError, match="trained with reason_step = 0"):
        ReaRec.set_reasoning_depth(SimpleNamespace(reason_step=0, reason_position_embedding=torch.zeros(0, 4)), 1)

    lares = SimpleNamespace(test_recurrence=4)
    assert LARES.set_reasoning_depth(lares, 16) == 4 and lares.test_recurrence == 16
    with pytest.raises(ValueError, match="test_recurrence"):
        LARES.set_reasoning_depth(lares, 0)

    r2ec = SimpleNamespace(max_reason_len=8, backbone=SimpleNamespace(max_reasoning_len=8))  # its position table's limit
    assert R2ec.set_reasoning_depth(r2ec, 0) == 8 and R2ec.set_reasoning_depth(r2ec, 8) == 0
    with pytest.raises(ValueError, match=r"r2ec_max_reason_len .* \[0, 8\]"):
        R2ec.set_reasoning_depth(r2ec, 9)  # the position table holds no more

    reg4rec = SimpleNamespace(beam_size=50, max_topk=20)
    assert REG4Rec.set_reasoning_depth(reg4rec, 20) == 50 and reg4rec.beam_size == 20
    with pytest.raises(ValueError, match=r"beam_size .* top-k \(20\)"):
        REG4Rec.set_reasoning_depth(reg4rec, 19)

    assert {m.reasoning_depth_key for m in (ReaRec, LARES, R2ec, REG4Rec)} == {
        "reason_step", "test_recurrence", "r2ec_max_reason_len", "beam_size"}


def _tiny_config(model, **overrides):
    return tiny_config(model, {"dataset": "tiny", "data_path": DATA_PATH, **overrides})


def test_r2ec_reasoning_length_reaches_generation_and_scores(tmp_path):
    config = _tiny_config("R2ec", checkpoint_dir=str(tmp_path), hidden_size=16, inner_size=32, n_layers=1, n_heads=2,
                          r2ec_hist_tokens_per_item=2, r2ec_max_reason_len=4, MAX_ITEM_LIST_LENGTH=5)
    init_seed(config["seed"], True)
    _, _, test_data = data_preparation(config, create_dataset(config))
    model = get_model("R2ec")(config, test_data._dataset).eval()
    model.reason_allowed[ANS] = False  # never [ANS] by choice: every reasoning runs to the budget
    batch = next(iter(test_data))[0][:16]
    prompt = model.user_prompt(batch)
    lengths = {}
    for depth in (0, 2, 4):
        model.set_reasoning_depth(depth)
        reasoning, sampled, _ = model.generate_reasoning(prompt)
        lengths[depth] = int(sampled.sum(1).max())
    assert lengths == {0: 0, 2: 2, 4: 4}
    model.set_reasoning_depth(0)
    no_reasoning = model.full_sort_predict(batch)
    model.set_reasoning_depth(4)
    assert not torch.allclose(no_reasoning, model.full_sort_predict(batch))


def test_reg4rec_number_of_paths_reaches_the_beam_search(tmp_path):
    small = {"mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_epochs": 2, "mpq_hidden_dim": 16, "mpq_latent_dim": 8,
             "mpq_input_dim": 16, "d_model": 16, "n_heads": 2, "n_enc_layers": 1, "n_dec_layers": 1, "ffn_dim": 32,
             "beam_size": 20, "MAX_ITEM_LIST_LENGTH": 5, "checkpoint_dir": str(tmp_path)}
    config = _tiny_config("REG4Rec", **small)
    init_seed(config["seed"], True)
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    model = REG4Rec(config, train_data._dataset).eval()
    model.set_item_tokens(mpq.build_item_tokens(config, train_data._dataset))
    batch = next(iter(test_data))[0][:4]
    reached = {}
    for beams in (20, 60):
        model.set_reasoning_depth(beams)
        reached[beams] = (model.full_sort_predict(batch) > UNREACHED).sum(1)
    assert (reached[60] >= reached[20]).all() and (reached[60] > reached[20]).any()


# -- the study end to end, and the stage-tagged TensorBoard tags of a two-stage run -------------------------------------
def test_depth_study_on_trained_checkpoints_writes_table_plot_and_tensorboard(tiny, tmp_path, monkeypatch):
    rearec = run_recbole_reason("ReaRec", config_file_list=[TINY_CONFIG], config_dict=tiny(reason_step=2, **FAST))

    trainers = []
    original = LARESTrainer.post_evaluate

    def keep_trainer(self, test_data):
        result = original(self, test_data)
        trainers.append(self)
        self.tensorboard.flush()
        return result

    monkeypatch.setattr(LARESTrainer, "post_evaluate", keep_trainer)
    lares = run_recbole_reason("LARES", config_file_list=[TINY_CONFIG], config_dict=tiny(
        n_pre_layers=1, n_core_layers=1, mean_recurrence=2, sampling_scheme="constant", rl_epochs=1, group_num=2,
        rl_train_batch_size=512, filter_iters=1, depth_scaling_recurrences=[1, 3], **FAST))

    # stage-tagged TensorBoard of the two-stage LARES run: losses, rewards, filter, transitions, depth scaling
    tags = _scalars(trainers[0].tensorboard.log_dir)
    for tag in ("spt/Loss/Train/ce", "spt/Loss/Train/tla", "spt/Loss/Train/sla", "spt/Valid/ndcg@10",
                "rpt/Loss/Train/loss", "rpt/reward", "rpt/kl", "rpt/rows_kept", "rpt/Valid/ndcg@10",
                "stage/depth_scaling", "depth/ndcg@10"):
        assert tag in tags, (tag, sorted(tags))
    assert tags["stage/spt"] == [(0, 1.0)] and tags["stage/rpt"] == [(1, 2.0)]  # RPT starts after SPT's one epoch

    out = str(tmp_path / "study")
    result = run_depth_study.main(["--checkpoints", f"{rearec['saved_model_file']} {lares['saved_model_file']}",
                                   "--labels", "ReaRec K=2,LARES T=2", "--out_dir", out])
    rows = {(row["label"], row["depth"]): row for row in result["rows"]}
    # defaults: below, at and beyond the trained depth (ReaRec 0..K+2; LARES 1, T, 2T and its scaling depths)
    assert sorted(d for label, d in rows if label == "ReaRec K=2") == [0, 1, 2, 3, 4]
    assert sorted(d for label, d in rows if label == "LARES T=2") == [1, 2, 3, 4]
    # the trained depth reproduces the training run's test result: the same weights, split and evaluator
    assert rows[("ReaRec K=2", 2)]["metrics"] == pytest.approx(dict(rearec["test_result"]))
    assert rows[("LARES T=2", 2)]["metrics"] == pytest.approx(dict(lares["test_result"]))
    # ... and a depth other than the trained one reproduces LARES's own depth-scaling evaluation at that depth
    assert rows[("LARES T=2", 3)]["metrics"] == pytest.approx(dict(lares["depth_results"][3]))
    assert rows[("ReaRec K=2", 0)]["metrics"] != rows[("ReaRec K=2", 2)]["metrics"]  # the knob changes the model

    md = open(result["files"]["md"]).read()
    assert "| ReaRec K=2 (ReaRec, tiny) | reason_step | 2 (trained) |" in md and md.count("\n|") == 2 + 9
    assert len(open(result["files"]["csv"]).read().splitlines()) == 1 + 9
    # the figure (matplotlib): PNG, PDF and SVG written; one panel per depth knob (their x axes differ), one line
    # per checkpoint drawn from the table's numbers, one legend
    assert open(result["files"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(result["files"]["pdf"], "rb").read(5) == b"%PDF-"
    ET.parse(result["files"]["svg"])
    figure = depth_figure(result["rows"], "ndcg@10")
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in panels] == ["reason_step", "test_recurrence"]
    drawn = [[line for line in ax.lines if not line.get_label().startswith("_")] for ax in panels]
    assert [[line.get_label() for line in lines] for lines in drawn] == [["ReaRec K=2"], ["LARES T=2"]]
    assert [len(lines[0].get_xdata()) for lines in drawn] == [5, 4]
    assert list(drawn[0][0].get_ydata()) == [rows[("ReaRec K=2", d)]["metrics"]["ndcg@10"] for d in range(5)]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["ReaRec K=2", "LARES T=2", "trained depth"]

    # the study's own TensorBoard scalars, depth as the step
    study_dirs = [d for d in glob.glob(str(tmp_path / "log_tensorboard" / "*")) if d != trainers[0].tensorboard.log_dir]
    study_tags = {}
    for folder in study_dirs:
        study_tags.update(_scalars(folder))
    assert [step for step, _ in study_tags["depth_study/ReaRec K=2/ndcg@10"]] == [0, 1, 2, 3, 4]

    # an invalid depth fails before any evaluation, naming the knob
    with pytest.raises(ValueError, match="reason_step"):
        depth_study(checkpoints=[rearec["saved_model_file"]], depths=[1, -1], out_dir=out)


def test_train_first_path_studies_the_checkpoint_it_trained(monkeypatch, tmp_path):
    calls = []

    def fake_run(model, dataset, config_file_list=None, config_dict=None, saved=True):
        calls.append((model, dataset, config_file_list, config_dict, saved))
        return {"saved_model_file": str(tmp_path / "missing.pth")}

    monkeypatch.setattr("recbole_reason.quick_start.run_recbole_reason", fake_run)
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        depth_study(model="ReaRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict={"epochs": 1})
    assert calls == [("ReaRec", "tiny", [TINY_CONFIG], {"epochs": 1}, True)]


# -- outputs and the other logging paths --------------------------------------------------------------------------------
def test_mpq_tokenizer_epochs_go_to_tensorboard(tmp_path):
    settings = mpq.TokenizerSettings(
        num_codebooks=2, codebook_size=4, max_codebooks=8, latent_dim=4, hidden_dim=8, input_dim=8, epochs=3,
        learning_rate=3e-3, batch_size=32, beta=0.25, lambda_vq=1.0, lambda_orth=0.1, lambda_bal=0.01,
        feature_source="features", cf_epochs=0, cf_patience=0, cf_layers=1, cf_learning_rate=1e-3, cf_dim=8, n_pseudo_cat=4, category_field=None, seed=0)
    torch.manual_seed(0)
    writer = SummaryWriter(str(tmp_path / "tb"))
    mpq.train_mpq(torch.randn(40, 8), settings, monitor=mpq.TokenizerMonitor(writer, show_progress=True))
    writer.close()
    tags = _scalars(str(tmp_path / "tb"))
    assert [step for step, _ in tags["tokenizer/mpq/recon"]] == [0, 1, 2]


def test_r2ec_loss_terms_are_named_per_stage():
    trainer = SimpleNamespace(stage="warmup", post_stage="recpo", model=None)
    losses = (torch.tensor(1.0), torch.tensor(2.0))
    assert R2ecTrainer._loss_names(trainer, losses) == ["rec", "lm"]
    trainer.stage = "recpo"
    assert R2ecTrainer._loss_names(trainer, losses) == ["token", "item"]


def test_cli_reads_config_settings_for_the_checkpoints():
    args, rest = run_depth_study.parse_args(["--checkpoints", "a.pth", "--depths", "1,2", "--data_path=/data",
                                             "--eval_batch_size=64"])
    assert args.depths == "1,2" and cli_config_overrides(rest) == {"data_path": "/data", "eval_batch_size": 64}
    with pytest.raises(ValueError, match="--key=value"):
        cli_config_overrides(["stray"])


def test_evaluation_data_path_is_the_parent_folder_as_in_training():
    stored = {"dataset": "tiny", "data_path": "/another/machine/data/tiny", "eval_batch_size": 4096}
    config = apply_evaluation_settings(dict(stored), {"data_path": DATA_PATH, "eval_batch_size": 64})
    assert config["data_path"] == os.path.join(DATA_PATH, "tiny") and config["eval_batch_size"] == 64
    assert apply_evaluation_settings(dict(stored), {})["data_path"] == stored["data_path"]  # nothing given: kept
    # ml-100k: this machine's embedded copy, whatever the checkpoint's machine stored and whatever data_path says
    ml100k = apply_evaluation_settings({"dataset": "ml-100k", "data_path": "/gpu/site-packages/ml-100k"},
                                       {"data_path": DATA_PATH})
    assert os.path.isfile(os.path.join(ml100k["data_path"], "ml-100k.inter"))


# Last in the file: resolving a RecBole model imports RecBole's model package, whose sine.py switches on autograd
# anomaly detection for the whole process (about twice slower training in the tests after it).
def test_a_model_without_a_depth_gets_a_clear_error_before_any_training(monkeypatch):
    monkeypatch.setattr("recbole_reason.quick_start.run_recbole_reason", lambda *a, **k: pytest.fail("no training"))
    with pytest.raises(ValueError, match=r"SASRec has no reasoning depth.*ReaRec \(reason_step\)"):
        depth_study(model="SASRec", dataset="tiny")
    with pytest.raises(ValueError, match="pass trained checkpoints, or a model and a dataset"):
        depth_study()
