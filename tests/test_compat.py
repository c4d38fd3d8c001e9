"""Each of the five RecBole 1.2.1 breakages on today's stack, and the fix in recbole_reason.compat.

Every test here fails if its fix is removed from compat.py (the subprocess tests also show the unfixed failure).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DATA_PATH, TINY_CONFIG
from recbole_reason import compat, run_recbole_reason

TINY_ARGS = f"config_file_list=[{TINY_CONFIG!r}], config_dict={{'data_path': {DATA_PATH!r}}}"


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_numpy2_aliases_make_config_work():
    unfixed = run_python(f"""
        from recbole.config import Config
        Config(model='GRU4Rec', dataset='tiny', {TINY_ARGS})
    """)
    assert "np.float_` was removed" in unfixed.stderr  # the breakage this fix exists for
    fixed = run_python(f"""
        import recbole_reason
        from recbole_reason import Config
        config = Config(model='GRU4Rec', dataset='tiny', {TINY_ARGS})
        import numpy as np
        assert np.float_ is np.float64 and np.long is np.int64
        print('ok', config['model'])
    """)
    assert fixed.returncode == 0, fixed.stderr
    assert "ok GRU4Rec" in fixed.stdout


def test_torch_checkpoint_reload_after_training(tiny):
    """RecBole's final evaluate(load_best_model=True) reads a pickled Config: weights_only=True cannot."""
    result = run_recbole_reason("GRU4Rec", config_file_list=[TINY_CONFIG], config_dict=tiny(), saved=True)
    assert result["test_result"]["ndcg@10"] >= 0
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(result["saved_model_file"])  # torch's default: the breakage
    checkpoint = compat.load_checkpoint(result["saved_model_file"])
    assert checkpoint["config"]["model"] == "GRU4Rec"


def test_token_seq_item_features_load_correctly(tiny):
    """pandas 3 broke token_seq loading (Series.agg(len)); we pin pandas<3 and refuse pandas 3 clearly."""
    from recbole_reason import Config, create_dataset

    dataset = create_dataset(Config(model="SASRec", dataset="tiny", config_file_list=[TINY_CONFIG], config_dict=tiny()))
    toy_story = dataset.token2id("item_id", "1")
    genres = [g for g in dataset.item_feat["class"][toy_story] if g != 0]
    assert list(dataset.id2token("class", genres)) == ["Animation", "Children's", "Comedy"]
    assert int(pd.__version__.split(".")[0]) < 3


def test_pandas3_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(pd, "__version__", "3.0.0")
    with pytest.raises(ImportError, match="pandas>=2.2,<3"):
        compat._check_pandas()


def test_ray_is_never_imported():
    """recbole.quick_start imports ray, which breaks on numpy 2 / setuptools >= 81: a full run must not need it."""
    code = f"""
        import sys
        class BlockRay:
            def find_spec(self, name, path=None, target=None):
                if name == 'ray' or name.startswith('ray.'):
                    raise ImportError('ray is blocked in this test')
        sys.meta_path.insert(0, BlockRay())
        import tempfile
        from recbole_reason import run_recbole_reason
        result = run_recbole_reason('GRU4Rec', 'tiny', config_file_list=[{TINY_CONFIG!r}],
            config_dict={{'data_path': {DATA_PATH!r}, 'checkpoint_dir': tempfile.mkdtemp()}}, saved=False)
        assert 'recbole.quick_start' not in sys.modules
        print('ok', result['test_result']['ndcg@10'])
    """
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                               timeout=300, cwd=DATA_PATH)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "ok" in completed.stdout


def test_hyperopt_grid_search_runs_every_point(tmp_path):
    """hyperopt >= 0.2.7 calls rng.integers, which RecBole's RandomState-based grid search lacks."""
    from recbole.trainer.hyper_tuning import HyperTuning

    seen = []

    def objective(config_dict, config_file_list):
        seen.append(config_dict["learning_rate"])
        return {"model": "toy", "best_valid_score": config_dict["learning_rate"], "valid_score_bigger": True,
                "best_valid_result": {"score": config_dict["learning_rate"]}, "test_result": {"score": 0.0}}

    params = tmp_path / "grid.hyper"
    params.write_text("learning_rate choice [0.01,0.02,0.03]\n")
    tuner = HyperTuning(objective, algo="exhaustive", params_file=str(params), early_stop=10)
    tuner.run()
    assert sorted(seen) == [0.01, 0.02, 0.03]
    assert tuner.best_params == {"learning_rate": 0.03}


def test_numpy_is_2():
    assert int(np.__version__.split(".")[0]) >= 2  # the suite runs on the stack the fixes are for


def test_recbole_models_do_not_leave_anomaly_detection_on():
    # Not one of the five breakages, but a RecBole side effect with a cost: sine.py turns anomaly detection on at
    # import, which slows every later training step in the process (baselines and plugin models alike).
    unfixed = run_python("""
        import torch
        import recbole.model.sequential_recommender
        print(torch.is_anomaly_enabled())
    """)
    assert unfixed.stdout.strip() == "True", unfixed.stderr
    fixed = run_python("""
        import torch
        import recbole_reason
        from recbole_reason.utils import get_model
        get_model('SASRec'), get_model('GRU4Rec')
        print(torch.is_anomaly_enabled())
    """)
    assert fixed.stdout.strip() == "False", fixed.stderr


def test_numpy_aliases_hold_without_building_a_config():
    # Evaluating a stored checkpoint (depth study) never builds a Config, so RecBole's own alias shim never runs;
    # its metrics still read np.float.
    code = """
        {imports}
        import numpy as np
        from recbole.evaluator.metrics import NDCG
        ndcg = NDCG.__new__(NDCG)
        print(ndcg.metric_info(np.array([[False, True]]), np.array([1])).tolist())
    """
    unfixed = run_python(code.format(imports="import recbole"))
    assert "has no attribute 'float'" in unfixed.stderr
    fixed = run_python(code.format(imports="import recbole_reason"))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.strip() == str([[0.0, float(1 / np.log2(3))]])
