"""The plugin path: registry, Config layering, baselines, the run script, checkpoints and clear errors."""

import glob
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from conftest import DATA_PATH, TINY_CONFIG
from recbole_reason import Config, get_model, get_trainer, objective_function, plugin_model_names, run_recbole_reason
from recbole_reason.checkpoint import CheckpointMixin
from recbole_reason.compat import load_checkpoint
from recbole_reason.config import properties_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_prefers_plugin_and_falls_back_to_recbole():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert "ReaRec" in plugin_model_names()
    assert get_model("ReaRec").__module__ == "recbole_reason.model.sequential_recommender.rearec"
    assert get_model("SASRec") is SASRec
    trainer = get_trainer(get_model("SASRec").type, "SASRec")
    assert issubclass(trainer, CheckpointMixin)
    assert get_trainer(get_model("ReaRec").type, "ReaRec").__name__ == "ReaRecTrainer"


def test_config_layers_plugin_yaml_for_baselines_and_datasets(tiny):
    sasrec = Config(model="SASRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict=tiny())
    assert sasrec["train_neg_sample_args"]["distribution"] == "none"  # plain RecBole raises for CE here
    assert sasrec["loss_type"] == "CE"
    assert sasrec["valid_metric"] == "NDCG@10"
    ml100k = Config(model="SASRec", dataset="ml-100k", config_dict={"gpu_id": ""})
    assert ml100k["load_col"]["item"] == ["item_id", "movie_title", "release_year", "class"]
    beauty = Config(model="SASRec", dataset="amazon-beauty", config_dict={"gpu_id": "", "data_path": "/elsewhere"})
    assert beauty["load_col"]["item"] == ["item_id", "attributes"]
    assert beauty["data_path"] == os.path.join("/elsewhere", "amazon-beauty")
    rearec = Config(model="ReaRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict=tiny(reason_step=3))
    assert rearec["reason_step"] == 3 and rearec["rearec_mode"] == "prl"  # model YAML loaded, overrides win
    assert os.path.isfile(os.path.join(properties_dir(), "model", "ReaRec.yaml"))


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec", "BERT4Rec"])
def test_recbole_baselines_run_through_the_plugin(model, tiny):
    result = objective_function(config_dict=tiny(model=model), config_file_list=[TINY_CONFIG], saved=False)
    assert result["model"] == model
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert set(result["test_result"]) >= {"ndcg@10", "recall@10", "ndcg@20", "recall@20"}


def test_saved_run_reloads_its_checkpoint(tiny):
    result = run_recbole_reason("ReaRec", "tiny", [TINY_CONFIG], tiny(epochs=2), saved=True)
    checkpoint = load_checkpoint(result["saved_model_file"])
    config = checkpoint["config"]
    from recbole.data import data_preparation

    from recbole_reason import create_dataset

    _, _, test_data = data_preparation(config, create_dataset(config))
    model = get_model("ReaRec")(config, test_data._dataset)
    trainer = get_trainer(model.type, "ReaRec")(config, model)
    reloaded = trainer.evaluate(test_data, load_best_model=True, model_file=result["saved_model_file"])
    assert dict(reloaded) == dict(result["test_result"])


def test_same_seed_same_metrics_on_cpu(tiny):
    first = objective_function(tiny(model="ReaRec"), [TINY_CONFIG], saved=False)
    second = objective_function(tiny(model="ReaRec"), [TINY_CONFIG], saved=False)
    assert first["test_result"] == second["test_result"]


def test_unknown_model_lists_the_plugin_models(tiny):
    with pytest.raises(ValueError, match=r"Unknown model 'ReaRecc'.*ReaRec"):
        Config(model="ReaRecc", dataset="tiny", config_dict=tiny())


def test_missing_dataset_fails_fast_without_download(tiny, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match=r"amazon-beauty.*--data_path"):
        run_recbole_reason("SASRec", "amazon-beauty", [TINY_CONFIG], tiny(data_path="/nonexistent"), saved=False)


@pytest.mark.parametrize("key, value, message", [
    ("reason_step", -1, "reason_step must be an integer >= 0"),
    ("rearec_mode", "foo", "rearec_mode must be one of"),
    ("temperature", 0, "temperature must be > 0"),
])
def test_invalid_rearec_setting_is_named(tiny, key, value, message):
    with pytest.raises(ValueError, match=message):
        run_recbole_reason("ReaRec", "tiny", [TINY_CONFIG], tiny(**{key: value}), saved=False)


def test_run_script_cli(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_reason.py"), "-m", "SASRec", "-d", "tiny",
         "--config_files", TINY_CONFIG, f"--data_path={DATA_PATH}", f"--checkpoint_dir={tmp_path}", "--state=INFO",
         "--epochs=1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = completed.stdout + completed.stderr
    assert "| split | recall@10" in output and "| test |" in output and "| best valid |" in output
    assert os.path.isdir(tmp_path / "log" / "SASRec") and os.path.isdir(tmp_path / "log_tensorboard")


def test_each_run_of_a_process_logs_to_its_own_file_and_tensorboard_folder(tiny, tmp_path):
    # RecBole's init_logger is a no-op once the root logger has handlers: the second run would log into the first's
    # file and TensorBoard folder (a comparison, a tuning trial, a loop over models in a notebook).
    for model in ("SASRec", "GRU4Rec"):
        run_recbole_reason(model, "tiny", [TINY_CONFIG], tiny(epochs=1), saved=False)
    for model in ("SASRec", "GRU4Rec"):
        assert len(glob.glob(str(tmp_path / "log" / model / f"{model}-tiny-*.log"))) == 1, model
        assert len(glob.glob(str(tmp_path / "log_tensorboard" / f"{model}-tiny-*"))) == 1, model
    assert len(os.listdir(tmp_path / "log_tensorboard")) == 2


def test_cli_reports_unknown_model_clearly(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_reason.py"), "--model=Nope", "--dataset=tiny"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert completed.returncode != 0
    assert "Unknown model 'Nope'" in completed.stderr
    assert completed.stderr.count("File ") <= 1  # one line of error, not a stack trace through RecBole


def test_device_follows_hardware(tiny):
    config = Config(model="SASRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict=tiny(gpu_id="0"))
    assert config["device"].type == ("cuda" if torch.cuda.is_available() else "cpu")


def _copy_tiny(tmp_path, name, transform):
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    lines = open(os.path.join(DATA_PATH, "tiny", "tiny.inter")).read().splitlines()
    (folder / f"{name}.inter").write_text("\n".join(transform(lines)) + "\n")
    return str(tmp_path / "data")


def test_inter_file_without_a_required_column_names_file_and_column(tiny, tmp_path):
    def drop_timestamp(lines):
        return ["\t".join(line.split("\t")[:3]) for line in lines]

    data_path = _copy_tiny(tmp_path, "notime", drop_timestamp)
    with pytest.raises(ValueError, match=r"notime\.inter has no column timestamp"):
        run_recbole_reason("SASRec", "notime", [TINY_CONFIG], tiny(data_path=data_path, load_col={"inter": ["user_id", "item_id"]}),
                           saved=False)
    assert not os.path.exists(tmp_path / "saved")  # nothing written


def test_empty_inter_file_is_named(tiny, tmp_path):
    data_path = _copy_tiny(tmp_path, "empty", lambda lines: lines[:1])
    with pytest.raises(ValueError, match=r"empty\.inter is empty"):
        run_recbole_reason("SASRec", "empty", [TINY_CONFIG], tiny(data_path=data_path), saved=False)


def test_scripts_compile_without_warnings():
    # bench/ has no tests of its own: a typo that only Python's compiler notices (e.g. a string "called" where a `+`
    # was missing, a SyntaxWarning) must fail here, not at the end of a two-hour benchmark
    import glob
    import warnings

    scripts = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "bench", "*.py"))
    assert any(path.endswith("run_bench.py") for path in scripts)
    for path in scripts:
        with open(path) as source, warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(source.read(), path, "exec")
