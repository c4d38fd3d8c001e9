"""Per-user metric values (recbole_reason.per_user): they are RecBole's own values before averaging, and the
paired tests over users are scipy's, one-sided in the stated direction."""

import numpy as np
import pytest
from recbole.utils import init_seed
from scipy import stats

from recbole_reason.per_user import (USER_ID, PerUserRecorder, align, load_per_user, paired_test, per_user_metrics,
                                     pool_over_seeds, save_per_user)
from recbole_reason.quick_start import _build

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread):
    config = tiny_config("SASRec", {"dataset": "tiny", "data_path": "tests/test_data",
                                    "checkpoint_dir": str(tmp_path_factory.mktemp("saved")), "epochs": 2})
    init_seed(config["seed"], config["reproducibility"])
    _, (train_data, valid_data, test_data), _, trainer = _build(config)
    trainer.fit(train_data, valid_data, saved=False)
    return trainer, valid_data, test_data


def test_per_user_values_average_to_recboles_result_for_every_topk_metric(trained):
    trainer, _, test_data = trained
    result, values = per_user_metrics(trainer, test_data)
    users = values[USER_ID]
    assert len(users) == len(np.unique(users)) == len(test_data.dataset)
    metric_keys = [key for key in values if key != USER_ID]
    assert sorted(metric_keys) == sorted(result)  # tiny.yaml's metrics are all top-k: none is dropped
    for key in metric_keys:
        assert values[key].shape == users.shape
        assert values[key].mean() == pytest.approx(result[key], abs=1e-4)  # RecBole rounds to 4 digits


def test_recorder_restores_the_trainer_and_records_each_evaluation(trained):
    trainer, valid_data, test_data = trained
    collect, evaluate = trainer.eval_collector.eval_batch_collect, trainer.evaluator.evaluate
    with PerUserRecorder(trainer) as recorder:
        trainer.evaluate(valid_data, load_best_model=False)
        trainer.evaluate(test_data, load_best_model=False)
    assert len(recorder.history) == 2 and recorder.last is recorder.history[1]
    assert not np.array_equal(recorder.history[0]["ndcg@10"], recorder.history[1]["ndcg@10"])
    assert trainer.eval_collector.eval_batch_collect == collect and trainer.evaluator.evaluate == evaluate


def test_saved_values_read_back(tmp_path, trained):
    trainer, _, test_data = trained
    _, values = per_user_metrics(trainer, test_data)
    save_per_user(tmp_path / "run.npz", values)
    back = load_per_user(tmp_path / "run.npz")
    assert back.keys() == values.keys()
    np.testing.assert_array_equal(back[USER_ID], values[USER_ID])
    for key in values:
        np.testing.assert_allclose(back[key], values[key], atol=1e-7)


def test_align_and_pool_match_users_by_id_not_by_position():
    a = {USER_ID: np.array([3, 1, 2]), "ndcg@10": np.array([0.3, 0.1, 0.2])}
    b = {USER_ID: np.array([2, 3, 4]), "ndcg@10": np.array([0.5, 0.6, 0.9])}
    left, right, users = align(a, b, "ndcg@10")
    assert users.tolist() == [2, 3] and left.tolist() == [0.2, 0.3] and right.tolist() == [0.5, 0.6]
    pooled = pool_over_seeds([a, b])
    assert pooled[USER_ID].tolist() == [2, 3]
    np.testing.assert_allclose(pooled["ndcg@10"], [0.35, 0.45])


def test_paired_test_is_scipys_and_one_sided_towards_the_model_being_better():
    rng = np.random.default_rng(0)
    baseline = rng.random(300)
    model = baseline + 0.05 + 0.1 * rng.standard_normal(300)
    better = paired_test(model, baseline)
    assert better["wilcoxon_p"] == pytest.approx(stats.wilcoxon(model - baseline, alternative="greater").pvalue)
    assert better["ttest_p"] == pytest.approx(stats.ttest_rel(model, baseline, alternative="greater").pvalue)
    assert better["wilcoxon_p"] < 0.01 and better["ttest_p"] < 0.01
    assert better["ci_low"] < better["mean_diff"] < better["ci_high"] and better["ci_low"] > 0
    assert better["rel_diff"] == pytest.approx((model.mean() - baseline.mean()) / baseline.mean())
    worse = paired_test(baseline, model)
    assert worse["wilcoxon_p"] > 0.99 and worse["ttest_p"] > 0.99 and worse["ci_high"] < 0
    assert paired_test(baseline, model, alternative="less")["ttest_p"] < 0.01


def test_paired_test_edge_cases():
    same = np.array([0.1, 0.2, 0.3])
    assert paired_test(same, same)["wilcoxon_p"] == 1.0 and paired_test(same, same)["ci_low"] == 0.0
    with pytest.raises(ValueError, match="same users"):
        paired_test(same, same[:2])
