"""Tuning: RecBole's HyperTuning with the three algorithms, through the plugin, on tiny data; the run script's
--hyper route; RecBole's result format and the best configuration as a YAML the run script accepts."""

import os
import sys
from types import SimpleNamespace

import pytest
import yaml

import run_recbole_reason
from conftest import TINY_CONFIG
from recbole_reason import Config
from recbole_reason.hyper import best_trial, default_params_file, tune

FAST = {"train_batch_size": 1024, "MAX_ITEM_LIST_LENGTH": 5}


@pytest.mark.parametrize("algo", ["exhaustive", "random", "bayes"])
def test_tuning_runs_each_algorithm_and_exports(algo, tiny, tmp_path):
    space = tmp_path / "space.hyper"
    space.write_text("learning_rate choice [0.01,0.001]\n")
    result_file, best_file = tmp_path / "out.result", tmp_path / "best.yaml"
    tuner = tune("GRU4Rec", "tiny", params_file=str(space), config_file_list=[TINY_CONFIG],
                 config_dict={**{k: v for k, v in tiny().items() if k != "dataset"}, **FAST}, algo=algo, max_evals=2,
                 output_file=str(result_file), best_config_file=str(best_file))
    assert 1 <= len(tuner.params2result) <= 2
    if algo == "exhaustive":
        assert len(tuner.params2result) == 2  # the whole grid
    # RecBole's export format: the parameter string, then the valid and test results of every trial
    exported = result_file.read_text()
    for params in tuner.params2result:
        assert f"{params}\nValid result:\n" in exported
    assert exported.count("Test result:") == len(tuner.params2result)

    # the best configuration round-trips: YAML == best_params, and the run script's --config_files reads it back
    best = yaml.safe_load(best_file.read_text())
    assert best == tuner.best_params and best["learning_rate"] in (0.01, 0.001)
    args = run_recbole_reason.parse_args(["--config_files", f"{TINY_CONFIG} {best_file}"])
    config = Config(model="GRU4Rec", dataset="tiny", config_file_list=args.config_files.split(" "), config_dict=tiny())
    assert config["learning_rate"] == best["learning_rate"]
    scores = {params: result["best_valid_score"] for params, result in tuner.params2result.items()}
    assert scores[tuner.params2str(tuner.best_params)] == max(scores.values())


def test_run_script_hyper_route_delegates_to_tune(monkeypatch, tmp_path):
    calls = []

    def fake_tune(model, dataset, **kwargs):
        calls.append((model, dataset, kwargs, list(sys.argv[1:])))
        return SimpleNamespace(best_params={"learning_rate": 0.01}, params2str=str, params2result={"{'learning_rate': 0.01}": {}})

    monkeypatch.setattr("recbole_reason.hyper.tune", fake_tune)
    run_recbole_reason.main(["--hyper", "-m", "ReaRec", "-d", "tiny", "--algo=bayes", "--max_evals=3",
                             f"--params_file={tmp_path}/space.hyper", "--config_files", TINY_CONFIG, "--epochs=2"])
    model, dataset, kwargs, config_argv = calls[0]
    assert (model, dataset) == ("ReaRec", "tiny")
    assert kwargs["algo"] == "bayes" and kwargs["max_evals"] == 3 and kwargs["params_file"] == f"{tmp_path}/space.hyper"
    assert kwargs["config_file_list"] == [TINY_CONFIG]
    assert kwargs["output_file"] == "hyper_ReaRec_tiny.result" and kwargs["best_config_file"] == "hyper_ReaRec_tiny.best.yaml"
    assert config_argv == ["--epochs=2"]  # only config overrides reach RecBole's command-line reader


def test_best_trial_is_right_where_recbole_bookkeeping_is_not():
    # RecBole replaces its best whenever the best so far is 0 (`if not self.best_score`): here it would keep 0.5
    smaller = [({"lr": 1}, {"best_valid_score": 0.0, "valid_score_bigger": False}),
               ({"lr": 2}, {"best_valid_score": 0.5, "valid_score_bigger": False})]
    assert best_trial(smaller) == ({"lr": 1}, 0.0)
    bigger = [({"lr": k}, {"best_valid_score": s, "valid_score_bigger": True}) for k, s in ((1, 0.1), (2, 0.3), (3, 0.2))]
    assert best_trial(bigger) == ({"lr": 2}, 0.3)


def test_every_plugin_model_ships_a_search_space():
    for model in ("ReaRec", "LARES", "R2ec", "REG4Rec"):
        names = [line.split()[0] for line in open(default_params_file(model)) if line.strip()]
        config = Config(model=model, dataset="ml-100k", config_dict={"gpu_id": ""})
        assert all(name in config.final_config_dict for name in names), (model, names)


def test_bad_tuning_arguments_are_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="algo must be one of"):
        tune("GRU4Rec", "tiny", params_file=os.devnull, algo="grid")
    with pytest.raises(ValueError, match="max_evals must be an integer >= 1"):
        tune("GRU4Rec", "tiny", params_file=os.devnull, max_evals=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tune("GRU4Rec", "tiny", params_file=str(tmp_path / "none.hyper"))
    space = tmp_path / "bad.hyper"
    space.write_text("learning_rate grid [0.01,0.001]\n")
    with pytest.raises(ValueError, match="bad lines: \\['learning_rate grid"):
        tune("GRU4Rec", "tiny", params_file=str(space))
    (tmp_path / "empty.hyper").write_text("# empty\n")  # RecBole skips lines of fewer than 3 words
    with pytest.raises(ValueError, match="defines no parameter"):
        tune("GRU4Rec", "tiny", params_file=str(tmp_path / "empty.hyper"))
