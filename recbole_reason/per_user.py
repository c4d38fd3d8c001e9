"""Per-user metric values of a RecBole evaluation, and paired tests over users.

RecBole's `Evaluator` averages every top-k metric over the evaluated users; a comparison of two models on the
*same* users has far more power when it keeps the per-user values and tests their paired differences. This module
records them from any trainer's `evaluate` (plugin trainers and RecBole's own alike) and tests them with scipy:

    with PerUserRecorder(trainer) as recorder:
        trainer.evaluate(test_data)
    values = recorder.last                  # {"user_id": int64[n], "ndcg@10": float64[n], ...}
    save_per_user("run.npz", values)
    paired_test(model["ndcg@10"], baseline["ndcg@10"])   # after `align` / `pool_over_seeds`

Only top-k metrics have per-user values (Recall, NDCG, Hit, MRR, Precision, MAP); corpus-level ones (ItemCoverage,
GiniIndex, AveragePopularity, ...) and AUC are skipped. One process only: under DDP each rank sees its own users.
"""

import inspect
from functools import reduce

import numpy as np
from recbole.evaluator.base_metric import TopkMetric
from scipy import stats

USER_ID = "user_id"


def values_from_struct(struct, metric_objects, topk, user_ids):
    """Per-user values of every top-k metric in `metric_objects` ({name: RecBole metric}) from a collected struct."""
    values = {USER_ID: np.asarray(user_ids, dtype=np.int64)}
    for name, metric in metric_objects.items():
        if not isinstance(metric, TopkMetric):
            continue
        pos_index, pos_len = metric.used_info(struct)
        # Hit, MRR and Precision read only the hit positions; Recall, NDCG and MAP also the number of positives.
        wants_pos_len = len(inspect.signature(metric.metric_info).parameters) == 2
        per_user = metric.metric_info(pos_index, pos_len) if wants_pos_len else metric.metric_info(pos_index)
        # per_user is [users, max k]: the value at every cut-off
        for k in topk:
            values[f"{name}@{k}"] = np.asarray(per_user[:, k - 1], dtype=np.float64)
    return values


class PerUserRecorder:
    """Records the per-user metric values of every `trainer.evaluate` call while active (a context manager).

    It wraps two bound methods of the trainer's own objects for the duration, so the evaluation itself, and its
    averaged result, are exactly RecBole's: `eval_collector.eval_batch_collect` (to read each batch's user ids, in
    the order the collector stacks the rows) and `evaluator.evaluate` (to read the collected struct).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.uid_field = trainer.config["USER_ID_FIELD"]
        self.topk = list(trainer.config["topk"])
        self.last = None
        self.history = []
        self._batch_users = []

    def __enter__(self):
        collector, evaluator = self.trainer.eval_collector, self.trainer.evaluator
        self._originals = collector.eval_batch_collect, evaluator.evaluate
        collect, evaluate = self._originals

        def eval_batch_collect(scores, interaction, positive_u, positive_i):
            self._batch_users.append(interaction[self.uid_field].detach().cpu().numpy())
            return collect(scores, interaction, positive_u, positive_i)

        def evaluate_and_record(struct):
            users = np.concatenate(self._batch_users) if self._batch_users else np.zeros(0, dtype=np.int64)
            self._batch_users = []
            self.last = values_from_struct(struct, evaluator.metric_class, self.topk, users)
            self.history.append(self.last)
            return evaluate(struct)

        collector.eval_batch_collect, evaluator.evaluate = eval_batch_collect, evaluate_and_record
        return self

    def __exit__(self, *exc):
        self.trainer.eval_collector.eval_batch_collect, self.trainer.evaluator.evaluate = self._originals
        return False


def per_user_metrics(trainer, eval_data, load_best_model=False, model_file=None):
    """Evaluate once and return (RecBole's averaged result, the per-user values)."""
    with PerUserRecorder(trainer) as recorder:
        result = trainer.evaluate(eval_data, load_best_model=load_best_model, model_file=model_file)
    return result, recorder.last


def save_per_user(path, values):
    """Compressed .npz, one array per key (float32 metric values: exact for RecBole's float64 at 1e-7)."""
    arrays = {key: (value if key == USER_ID else value.astype(np.float32)) for key, value in values.items()}
    np.savez_compressed(path, **arrays)


def load_per_user(path):
    with np.load(path) as data:
        return {key: data[key].astype(np.int64 if key == USER_ID else np.float64) for key in data.files}


def align(values_a, values_b, metric):
    """The two runs' values of `metric` on the users both evaluated, in one user order."""
    common, index_a, index_b = np.intersect1d(values_a[USER_ID], values_b[USER_ID], return_indices=True)
    return values_a[metric][index_a], values_b[metric][index_b], common


def _rows_of(users, wanted):
    """Row index in `users` of each id in `wanted` (all present)."""
    order = np.argsort(users)
    return order[np.searchsorted(users, wanted, sorter=order)]


def pool_over_seeds(runs):
    """Average several runs' per-user values (e.g. the seeds of one model) over the users all of them evaluated."""
    users = reduce(np.intersect1d, [run[USER_ID] for run in runs])
    rows = [_rows_of(run[USER_ID], users) for run in runs]
    pooled = {USER_ID: users}
    for key in runs[0]:
        if key != USER_ID:
            pooled[key] = np.mean([run[key][index] for run, index in zip(runs, rows)], axis=0)
    return pooled


def paired_test(model_values, baseline_values, alternative="greater", n_boot=9999, confidence=0.95, seed=0):
    """Paired comparison over users of a model's per-user values against a baseline's (same users, same order).

    `alternative="greater"`: H1 is "the model is better" for a bigger-is-better metric ("less" for smaller-is-better).
    Returns the mean difference, the relative difference, one-sided p-values of the Wilcoxon signed-rank test and
    of the paired t-test, and a percentile-bootstrap `confidence` interval of the mean difference.
    """
    model_values = np.asarray(model_values, dtype=np.float64)
    baseline_values = np.asarray(baseline_values, dtype=np.float64)
    if model_values.shape != baseline_values.shape or model_values.ndim != 1:
        raise ValueError(f"paired_test needs two 1-d arrays over the same users, got shapes "
                         f"{model_values.shape} and {baseline_values.shape}")
    diff = model_values - baseline_values
    baseline_mean = float(baseline_values.mean()) if len(diff) else float("nan")
    result = {
        "n": int(len(diff)),
        "mean_model": float(model_values.mean()) if len(diff) else float("nan"),
        "mean_baseline": baseline_mean,
        "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
        "rel_diff": float(diff.mean() / baseline_mean) if len(diff) and baseline_mean else float("nan"),
    }
    if len(diff) < 2 or not np.any(diff):
        # No user differs: no evidence either way; the interval is the point 0.
        return {**result, "wilcoxon_p": 1.0, "ttest_p": 1.0, "ci_low": 0.0, "ci_high": 0.0}
    result["wilcoxon_p"] = float(stats.wilcoxon(diff, alternative=alternative).pvalue)
    result["ttest_p"] = float(stats.ttest_rel(model_values, baseline_values, alternative=alternative).pvalue)
    interval = stats.bootstrap((diff,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                               method="percentile", vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    result["ci_low"], result["ci_high"] = float(interval.low), float(interval.high)
    return result


def paired_over_seeds(model_runs, baseline_runs, metric, alternative="greater", **kwargs):
    """`paired_test` of one metric between two models' runs ({seed: per-user values}), pooled over the seeds both
    ran: each model's values are averaged over those seeds per user (`pool_over_seeds`), then paired by user id.
    Returns paired_test's dict plus `seeds` (the seeds used), or None when no seed is shared."""
    seeds = sorted(set(model_runs) & set(baseline_runs))
    if not seeds:
        return None
    model = pool_over_seeds([model_runs[seed] for seed in seeds])
    baseline = pool_over_seeds([baseline_runs[seed] for seed in seeds])
    model_values, baseline_values, _ = align(model, baseline, metric)
    return {**paired_test(model_values, baseline_values, alternative=alternative, **kwargs), "seeds": seeds}
