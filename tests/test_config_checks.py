"""Configuration mistakes end in one line naming the key (or the file, line and column) before any dataset is read;
a key nothing reads, or a gpu_id naming a GPU the machine lacks, is said out loud. Each class of mistake below went
through silently, or failed late or with a traceback, before these checks (issue 17)."""

import logging
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import DATA_PATH, TINY_CONFIG
from recbole_reason import run_recbole_reason
from recbole_reason.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(tmp_path, yaml_text=None, model="SASRec", dataset="tiny", **settings):
    """A Config on tests/tiny.yaml, plus a config file holding `yaml_text` when given."""
    files = [TINY_CONFIG]
    if yaml_text is not None:
        files.append(str(tmp_path / "my.yaml"))
        (tmp_path / "my.yaml").write_text(yaml_text)
    return Config(model=model, dataset=dataset, config_file_list=files,
                  config_dict={"data_path": DATA_PATH, "checkpoint_dir": str(tmp_path / "saved"), **settings})


def one_error(tmp_path, yaml_text=None, **settings):
    with pytest.raises(ValueError) as caught:
        build(tmp_path, yaml_text, **settings)
    message = str(caught.value)
    assert "\n" not in message, message  # one mistake, one line
    return message


# ---------------------------------------------------------------------------------------------------------------
# 1. a numeric setting given as text, a sequence length of 0, a config file that is not YAML: were tracebacks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, expected", [
    ('learning_rate: "0.001"\n', r"^learning_rate = '0\.001' \(text, set in \S*my\.yaml\): must be a number > 0\. "
                                 r"Fix: write it without quotes.*learning_rate: 0\.001"),
    ('train_batch_size: "256"\n', r"^train_batch_size = '256' \(text, set in \S*my\.yaml\): must be an integer >= 1"),
    ('hidden_size: "64"\n', r"^hidden_size = '64' \(text, set in \S*my\.yaml\): must be an integer >= 1"),
    ("MAX_ITEM_LIST_LENGTH: 0\n", r"^MAX_ITEM_LIST_LENGTH = 0 \(set in \S*my\.yaml\): must be an integer >= 1"),
    ('reproducibility: "False"\n', r"^reproducibility = 'False' \(text, set in \S*my\.yaml\): must be true or false"),
    ("seed: one\n", r"^seed = 'one' \(set in \S*my\.yaml\): must be an integer in \[0, 2\*\*32\)"),
])
def test_wrong_type_or_range_names_key_value_file_and_fix(tmp_path, yaml_text, expected):
    assert re.search(expected, one_error(tmp_path, yaml_text)), one_error(tmp_path, yaml_text)


def test_a_plugin_models_numeric_key_given_as_text_is_refused_by_its_default_type(tmp_path):
    message = one_error(tmp_path, 'kl_weight: "0.1"\n', model="ReaRec")
    assert message.startswith("kl_weight = '0.1' (text, set in") and "like its default" in message


@pytest.mark.parametrize("yaml_text, line, column", [
    ("epochs: 2\n\tlearning_rate: 0.1\n", 2, 1),                # a tab
    ("metrics: [Recall, NDCG\nepochs: 3\n", 2, 7),             # an unclosed bracket
    ("epochs: 2\nlearning_rate 0.001\ntopk: 10\n", 2, 1),      # a key without its colon
])
def test_malformed_yaml_names_file_line_and_column(tmp_path, yaml_text, line, column):
    message = one_error(tmp_path, yaml_text)
    assert message.startswith(f"{tmp_path / 'my.yaml'}, line {line}, column {column}: not valid YAML ("), message
    assert "Fix: one 'key: value' per line" in message


def test_a_config_file_that_is_not_a_mapping_or_does_not_exist_is_named(tmp_path):
    assert one_error(tmp_path, "- epochs\n- 2\n").startswith(f"{tmp_path / 'my.yaml'}: a config file is a mapping")
    with pytest.raises(ValueError, match=r"^Config file \S*nowhere\.yaml does not exist"):
        Config(model="SASRec", dataset="tiny", config_file_list=[str(tmp_path / "nowhere.yaml")])
    build(tmp_path, "# only a comment\n")  # an empty file sets nothing (RecBole itself fails on it)


# ---------------------------------------------------------------------------------------------------------------
# 2. late or misleading: an unknown metric in valid_metric failed after the first epoch, repeating the name
# ---------------------------------------------------------------------------------------------------------------
def test_valid_metric_that_no_metric_computes_fails_before_training_with_the_choices(tmp_path):
    message = one_error(tmp_path, valid_metric="NDGC@10")
    assert message.startswith("valid_metric = 'NDGC@10' (set in config_dict): must be one of the metrics this run "
                              "computes (metrics x topk: Recall@10, Recall@20, NDCG@10"), message
    assert "did you mean 'NDCG@10'?" in message
    # a real metric at a k that topk does not compute fails the same way
    assert "valid_metric = 'NDCG@5'" in one_error(tmp_path, valid_metric="NDCG@5")
    build(tmp_path, valid_metric="mrr@20")  # case-insensitive, as RecBole


@pytest.mark.parametrize("settings, expected", [
    (dict(metrics=["Recall", "NDGC"]), r"^metrics = \['Recall', 'NDGC'\] .*'NDGC' is none .*did you mean 'NDCG'\?"),
    (dict(metrics=["Recall", "RMSE"]), r"^metrics = .*either ranking metrics .* or value metrics"),
    (dict(topk=[10, 0]), r"^topk = \[10, 0\] .*must be an integer >= 1 or a non-empty list of them"),
    (dict(eval_args={"split": {"LS": "valid_and_tset"}, "order": "TO", "mode": "full"}),
     r"^eval_args\.split = \{'LS': 'valid_and_tset'\} .*one of valid_and_test, valid_only, test_only"),
    (dict(eval_args={"spilt": {"LS": "valid_and_test"}, "order": "TO"}),
     r"^eval_args = .*'spilt' is none.*did you mean 'split'\?"),
    (dict(eval_args={"order": "TO", "mode": "uni"}), r"^eval_args\.mode = 'uni' .*full, labeled, uni<N> or pop<N>"),
    (dict(gpu_id="zero"), r"^gpu_id = 'zero' .*GPU ids separated by commas"),
    (dict(state="LOUD"), r"^state = 'LOUD' .*a log level"),
    (dict(learner="adamm"), r"^learner = 'adamm' .*one of adam, adamw, sgd"),
    (dict(user_inter_num_interval="[4,inf"), r"^user_inter_num_interval = '\[4,inf' .*intervals like"),
])
def test_evaluation_and_other_settings_are_checked_before_recbole_reads_them(tmp_path, settings, expected):
    assert re.search(expected, one_error(tmp_path, **settings)), one_error(tmp_path, **settings)


def test_values_as_recbole_converts_them_pass(tmp_path):
    """Guard: a config_dict's "[20,25]" arrives as the list [20, 25] (RecBole evaluates the text), which RecBole's
    interval filter reads as str(value); a single metric or k need no list; a metric's case does not matter."""
    for interval in ("[20,25]", "(0,1];[3,inf)", "[1e1,2e3]"):
        build(tmp_path, user_inter_num_interval=interval)
    build(tmp_path, metrics="Recall", topk=10, valid_metric="recall@10")


# ---------------------------------------------------------------------------------------------------------------
# 3. silence: a negative epoch count, a key nothing reads, a gpu_id the machine lacks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("epochs", -1), ("stopping_step", -2), ("eval_step", -1)])
def test_negative_counts_are_refused(tmp_path, key, value):
    assert one_error(tmp_path, **{key: value}).startswith(f"{key} = {value} (set in config_dict): must be an integer "
                                                          ">= 0")


def test_a_key_nothing_reads_is_warned_with_the_closest_known_key(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    build(tmp_path, "learnign_rate: 0.01\n", max_item_list_length=20, zzz_made_up=1)
    lines = [record.getMessage() for record in caplog.records]
    assert (f"config key 'learnign_rate' (set in {tmp_path / 'my.yaml'}) is read by no model and no part of RecBole "
            "or recbole-reason: it has no effect. Did you mean 'learning_rate'?") in lines, lines
    assert any("'max_item_list_length' (set in config_dict)" in line and "Did you mean 'MAX_ITEM_LIST_LENGTH'?" in line
               for line in lines), lines
    assert any("'zzz_made_up'" in line and "Did you mean" not in line for line in lines), lines


def test_keys_of_other_models_and_model_types_are_known(tmp_path, caplog):
    """ReaRec's reason_step with SASRec (a comparison's shared config), RecBole's keys of a general model (NeuMF's
    mlp_hidden_size), of a knowledge-based one (KGAT's kg_embedding_size), the launcher's nproc: no warning."""
    caplog.set_level(logging.WARNING)
    build(tmp_path, reason_step=2, mlp_hidden_size=[64], kg_embedding_size=32, mpq_codebook_size=64)
    assert not [r for r in caplog.records if "config key" in r.getMessage()], caplog.text


def test_every_shipped_config_passes_without_a_warning(tmp_path, caplog):
    """Guard: the checks refuse none of our own settings (every plugin model and the baselines, every shipped file)."""
    from recbole_reason import plugin_model_names

    caplog.set_level(logging.WARNING)
    files = [os.path.join(REPO, path) for path in ("properties/cpu.yaml", "bench/configs/cpu.yaml",
                                                    "bench/configs/gpu.yaml")]
    for model in plugin_model_names() + ["SASRec", "GRU4Rec", "BERT4Rec"]:
        for file in files:
            Config(model=model, dataset="tiny", config_file_list=[TINY_CONFIG, file],
                   config_dict={"data_path": DATA_PATH, "gpu_id": ""})
        Config(model=model, dataset="ml-100k", config_dict={"gpu_id": ""})
    assert not caplog.records, caplog.text


def test_gpu_id_naming_a_gpu_the_machine_lacks_is_said(tmp_path, caplog):
    """Here, for real: gpu_id 63 exists on no machine. Without any GPU (this CPU) it is a warning and the run goes on
    on the CPU; on a machine with GPUs it is an error."""
    import torch

    caplog.set_level(logging.WARNING)
    try:
        config = build(tmp_path, gpu_id="63")
    except ValueError as error:
        assert torch.cuda.is_available() or os.path.isdir("/proc/driver/nvidia/gpus")
        assert str(error).startswith("gpu_id = '63': this machine has ")
    else:
        assert config["device"].type == "cpu"
        assert "gpu_id = '63' names a GPU, but" in caplog.text and "trains on the CPU" in caplog.text


def test_gpu_id_naming_a_missing_gpu_on_a_gpu_machine_is_an_error(tmp_path, monkeypatch):
    """The GPU-machine branch (no GPU here): two GPUs, gpu_id '5' makes CUDA see none, RecBole would use the CPU."""
    import torch

    from recbole_reason.data import config_checks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config_checks, "machine_gpu_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^gpu_id = '5': this machine has 2 GPU\(s\), ids 0 to 1.*Fix: --gpu_id=0"):
        build(tmp_path, gpu_id="5")


def test_the_default_gpu_id_on_a_machine_without_gpu_stays_quiet(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    Config(model="SASRec", dataset="tiny", config_dict={"data_path": DATA_PATH})  # RecBole's gpu_id '0', not set
    assert "gpu_id" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# 4. when: before any dataset is read, in under a second; all at once; one line from the run script
# ---------------------------------------------------------------------------------------------------------------
def test_checks_run_before_the_dataset_is_read_and_take_under_a_second(tmp_path, monkeypatch):
    import recbole_reason.quick_start as quick_start
    from recbole_reason.config import properties_dir
    from recbole_reason.data import config_checks

    read = []
    monkeypatch.setattr(quick_start, "create_dataset", lambda config: read.append(config) or 1 / 0)
    # the dataset does not even exist: the config error comes first, and nothing is read or written
    with pytest.raises(ValueError, match=r"^epochs = -1"):
        run_recbole_reason("SASRec", "nowhere", [TINY_CONFIG],
                           {"data_path": str(tmp_path / "empty"), "epochs": -1, "checkpoint_dir": str(tmp_path / "s")})
    assert read == [] and not (tmp_path / "s").exists()

    config = build(tmp_path)
    config_checks.known_keys.cache_clear()  # the first Config of a process scans RecBole's YAML and code
    start = time.perf_counter()
    config_checks.check_config(config, properties_dir())
    assert time.perf_counter() - start < 1.0


def test_every_mistake_is_reported_at_once_one_line_each(tmp_path):
    with pytest.raises(ValueError) as caught:
        build(tmp_path, 'learning_rate: "1e-3"\nepochs: -5\n', valid_metric="NDCG@100")
    lines = str(caught.value).splitlines()
    assert [line.split(" ")[0] for line in lines] == ["learning_rate", "epochs", "valid_metric"], lines


def test_the_run_script_prints_one_line_for_a_config_mistake(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\n\tlearning_rate: 0.1\n")
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_reason.py"), "-m", "SASRec", "-d", "ml-100k",
         f"--config_files={bad}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode != 0
    assert f"error: {bad}, line 2, column 1: not valid YAML" in completed.stderr, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
