"""Tuning: RecBole's HyperTuning with the three algorithms, through the plugin, on tiny data."""

import os

import pytest
import yaml

from conftest import TINY_CONFIG
from recbole_reason import Config
from recbole_reason.hyper import default_params_file, tune


@pytest.mark.parametrize("algo", ["exhaustive", "random", "bayes"])
def test_tuning_runs_each_algorithm_and_exports(algo, tiny, tmp_path):
    space = tmp_path / "space.hyper"
    space.write_text("learning_rate choice [0.01,0.001]\n")
    result_file, best_file = tmp_path / "out.result", tmp_path / "best.yaml"
    tuner = tune("GRU4Rec", "tiny", params_file=str(space), config_file_list=[TINY_CONFIG],
                 config_dict={k: v for k, v in tiny().items() if k != "dataset"}, algo=algo, max_evals=2,
                 output_file=str(result_file), best_config_file=str(best_file))
    assert 1 <= len(tuner.params2result) <= 2
    if algo == "exhaustive":
        assert len(tuner.params2result) == 2  # the whole grid
    assert "Test result" in result_file.read_text()
    best = yaml.safe_load(best_file.read_text())
    assert best["learning_rate"] in (0.01, 0.001)
    config = Config(model="GRU4Rec", dataset="tiny", config_file_list=[TINY_CONFIG, str(best_file)], config_dict=tiny())
    assert config["learning_rate"] == best["learning_rate"]  # the run script accepts the exported best config


def test_every_plugin_model_ships_a_search_space():
    for model in ("ReaRec", "LARES", "R2ec", "REG4Rec"):
        names = [line.split()[0] for line in open(default_params_file(model)) if line.strip()]
        config = Config(model=model, dataset="ml-100k", config_dict={"gpu_id": ""})
        assert all(name in config.final_config_dict for name in names), (model, names)


def test_unknown_algorithm_is_named(tiny):
    with pytest.raises(ValueError, match="algo must be one of"):
        tune("GRU4Rec", "tiny", params_file=os.devnull, algo="grid")
