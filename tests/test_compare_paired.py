"""Per-user paired significance in the comparison tables, controls and selection on valid, --jobs and resume."""

import json
import os

import numpy as np
import pytest
from scipy import stats

import run_compare
from conftest import TINY_CONFIG
from recbole_reason.compare import compare
from recbole_reason.per_user import USER_ID, load_per_user, paired_over_seeds, save_per_user
from recbole_reason.tables import RUNS_FILE, build_tables, select_on_valid


# -- the pooled paired test against scipy, on known inputs -------------------------------------------------------
def test_paired_over_seeds_pools_by_user_and_agrees_with_scipy():
    rng = np.random.default_rng(0)
    users = np.arange(1, 201)
    truth_base = rng.random(200) * 0.2
    model_runs, base_runs = {}, {}
    for seed in (1, 2, 3):
        order_m, order_b = rng.permutation(200), rng.permutation(200)  # each run lists its users in its own order
        model_runs[seed] = {USER_ID: users[order_m], "ndcg@10": (truth_base + 0.01 + rng.normal(0, 0.05, 200))[order_m]}
        base_runs[seed] = {USER_ID: users[order_b], "ndcg@10": (truth_base + rng.normal(0, 0.05, 200))[order_b]}
    base_runs[4] = base_runs[1]  # a seed only the baseline ran is left out of the pairing
    test = paired_over_seeds(model_runs, base_runs, "ndcg@10")
    # by hand: per-user mean over seeds 1-3 in user-id order, then scipy on the paired arrays
    def pooled(runs):
        return np.mean([runs[s]["ndcg@10"][np.argsort(runs[s][USER_ID])] for s in (1, 2, 3)], axis=0)
    m, b = pooled(model_runs), pooled(base_runs)
    assert test["seeds"] == [1, 2, 3] and test["n"] == 200
    assert test["mean_diff"] == pytest.approx((m - b).mean())
    assert test["rel_diff"] == pytest.approx((m - b).mean() / b.mean())
    assert test["wilcoxon_p"] == pytest.approx(stats.wilcoxon(m - b, alternative="greater").pvalue)
    assert test["ttest_p"] == pytest.approx(stats.ttest_rel(m, b, alternative="greater").pvalue)
    assert test["ci_low"] < (m - b).mean() < test["ci_high"]
    # one-sided in the right direction: the model is better, so H1 'better' has a small p and the swap a large one
    assert test["wilcoxon_p"] < 0.01 and test["ttest_p"] < 0.01
    swapped = paired_over_seeds(base_runs, model_runs, "ndcg@10")
    assert swapped["wilcoxon_p"] > 0.99 and swapped["ttest_p"] > 0.99 and swapped["mean_diff"] < 0
    assert paired_over_seeds(model_runs, {9: base_runs[1]}, "ndcg@10") is None  # no shared seed


# -- a planted per-user gain: the users see it, three seed means do not -----------------------------------------
def _planted_table(folder, gain=0.004, n_users=943, seeds=(2020, 2021, 2022)):
    """Hand-made runs of a baseline and a model that is better on every user by `gain` on average (the same users
    in every seed), with seed-to-seed swings of the whole metric larger than the gain. Returns the run records."""
    rng = np.random.default_rng(7)
    users = np.arange(1, n_users + 1)
    user_level = rng.beta(1, 12, n_users)  # each user's own difficulty: shared by both models and all seeds
    os.makedirs(folder / "per_user", exist_ok=True)
    records = []
    seed_shift = {"Base": [0.0, 0.012, -0.010], "Model": [-0.011, 0.009, 0.004]}  # training noise of each run
    for label, extra in (("Base", 0.0), ("Model", gain)):
        for i, seed in enumerate(seeds):
            values = np.clip(user_level + extra + seed_shift[label][i] + rng.normal(0, 0.004, n_users), 0, 1)
            path = f"per_user/{label}_{seed}.npz"
            save_per_user(folder / path, {USER_ID: users, "ndcg@10": values})
            records.append({"label": label, "model": label, "dataset": "ml", "seed": seed, "setup": "s",
                            "test": {"ndcg@10": float(values.mean())}, "valid": {"ndcg@10": float(values.mean())},
                            "eval_setup": {"valid_metric": "NDCG@10"}, "config_files": [], "per_user_file": path,
                            **({"control_of": "Model"} if label == "Base" else {})})
    with open(folder / RUNS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def test_a_planted_per_user_gain_is_detected_where_the_seed_t_test_is_not(tmp_path):
    _planted_table(tmp_path)
    files, summary = build_tables(str(tmp_path), baseline="Base")
    cell = next(r for r in summary[0]["rows"] if r["label"] == "Model")["metrics"]["ndcg@10"]
    assert cell["p"] > 0.1  # three seed means: the gain drowns in the seed-to-seed swings
    tests = [t for t in summary[0]["paired"] if t["model"] == "Model" and t["reference"] == "Base"]
    assert {t["kind"] for t in tests} == {"baseline", "control"}  # Base is both the baseline and Model's control
    for test in tests:
        assert test["wilcoxon_p"] < 1e-6 and test["ttest_p"] < 1e-6 and test["n"] == 943
        assert test["ci_low"] > 0 and test["seed_ttest_p"] == pytest.approx(cell["p"])
        assert test["rel_diff"] == pytest.approx(test["mean_diff"] / test["mean_baseline"])
    md = open(files["md"]).read()
    assert "| Base (baseline; control of Model) |" in md and "**Paired tests over users**" in md
    assert "| Model | Base (control) | ndcg@10 | 3 | 943 |" in md
    paired_csv = open(files["paired_csv"]).read().splitlines()
    assert paired_csv[0].startswith("dataset,model,reference,kind,metric") and len(paired_csv) == 3


def test_no_planted_gain_no_per_user_detection(tmp_path):
    """The same table without the gain: the per-user tests must not find one (the test above can fail)."""
    _planted_table(tmp_path, gain=0.0)
    _, summary = build_tables(str(tmp_path), baseline="Base")
    test = next(t for t in summary[0]["paired"] if t["kind"] == "baseline")
    assert test["wilcoxon_p"] > 0.05 and test["ttest_p"] > 0.05 and test["ci_low"] < 0 < test["ci_high"]


def test_a_grid_is_chosen_on_valid_not_test():
    def run(label, seed, valid, test, control_of=None, group="M (tau on valid)"):
        return {"label": label, "dataset": "d", "seed": seed, "select": group, "valid": {"ndcg@10": valid},
                "test": {"ndcg@10": test}, "eval_setup": {"valid_metric": "NDCG@10"},
                **({"control_of": control_of} if control_of else {})}
    records = [run("M-a", 1, 0.30, 0.10), run("M-a", 2, 0.32, 0.11), run("M-b", 1, 0.20, 0.90), run("M-b", 2, 0.21, 0.91),
               run("K-a", 1, 0.1, 0.1, "M-a", "K (tau on valid)"), run("K-b", 1, 0.3, 0.2, "M-b", "K (tau on valid)")]
    chosen = [r for r in select_on_valid(records) if r["label"] in ("M (tau on valid)", "K (tau on valid)")]
    m = [r for r in chosen if r["label"] == "M (tau on valid)"]
    assert {r["selected"] for r in m} == {"M-a"} and [r["test"]["ndcg@10"] for r in m] == [0.10, 0.11]  # not M-b's test
    k = [r for r in chosen if r["label"] == "K (tau on valid)"]
    assert [r["selected"] for r in k] == ["K-b"] and k[0]["control_of"] == "M (tau on valid)"


# -- real runs on tiny data: stored per-user values, an inference-time control, --jobs, resume ------------------------
def _shared(tiny):
    return {**{k: v for k, v in tiny().items() if k != "dataset"}, "train_batch_size": 1024, "MAX_ITEM_LIST_LENGTH": 5,
            "epochs": 2, "eval_step": 1}


# REG4Rec at the size of tests/test_speed.py (its tokenizer and beam search dominate the cost otherwise)
SMALL_REG4REC = {"epochs": 1, "pars_epochs": 0, "mpq_epochs": 2, "mpq_cf_epochs": 1, "mpq_num_codebooks": 3,
                 "mpq_codebook_size": 12, "mpq_hidden_dim": 16, "mpq_latent_dim": 4, "mpq_input_dim": 8, "d_model": 16,
                 "n_enc_layers": 1, "n_dec_layers": 1, "ffn_dim": 32, "beam_size": 20, "n_pseudo_cat": 4}


def test_per_user_values_are_stored_beside_each_run_and_read_back_with_an_inference_time_control(tiny, tmp_path):
    out = tmp_path / "cmp"
    result = compare(["SASRec", "REG4Rec", "REG4Rec-noCORP"], ["tiny"], [1], config_file_list=[TINY_CONFIG],
                     config_dict={**_shared(tiny), **SMALL_REG4REC}, baseline="SASRec", out_dir=str(out))
    for record in result["records"]:
        values = load_per_user(out / record["per_user_file"])
        assert values[USER_ID].dtype == np.int64 and len(np.unique(values[USER_ID])) == len(values[USER_ID]) > 100
        for metric in ("ndcg@10", "recall@20", "mrr@10"):  # RecBole's averaged result is the mean of the stored values
            assert values[metric].mean() == pytest.approx(record["test"][metric], abs=1e-4)
    trained, control = result["records"][1:]
    assert control["label"] == "REG4Rec-noCORP" and control["from_run_of"] == "REG4Rec"
    assert control["eval_attributes"] == {"corp": "off"} and control["setup"] == trained["setup"]
    files = run_compare.main(["--rebuild", "--out_dir", str(out), "--baseline", "SASRec"])
    md = open(files["md"]).read()
    assert "| REG4Rec-noCORP (control of REG4Rec) |" in md and "| REG4Rec | REG4Rec-noCORP (control) | ndcg@10 | 1 |" in md
    assert "| REG4Rec | SASRec | ndcg@10 | 1 |" in md


def test_jobs_2_gives_the_records_of_jobs_1_and_an_interrupted_plan_resumes(tiny, tmp_path, monkeypatch):
    models, seeds, shared = ["SASRec"], [1, 2], _shared(tiny)
    serial = compare(models, ["tiny"], seeds, config_file_list=[TINY_CONFIG], config_dict=shared, out_dir=str(tmp_path / "a"),
                     threads=1)["records"]
    parallel = compare(models, ["tiny"], seeds, config_file_list=[TINY_CONFIG], config_dict=shared,
                       out_dir=str(tmp_path / "b"), jobs=2, threads=1)["records"]

    def by_run(records):
        return {(r["label"], r["seed"]): r for r in records}
    assert by_run(serial).keys() == by_run(parallel).keys() and len(serial) == 2
    for key, record in by_run(serial).items():
        other = by_run(parallel)[key]
        assert record["test"] == other["test"] and record["valid"] == other["valid"] and record["setup"] == other["setup"]
        a, b = load_per_user(tmp_path / "a" / record["per_user_file"]), load_per_user(tmp_path / "b" / other["per_user_file"])
        assert np.array_equal(a[USER_ID], b[USER_ID]) and np.array_equal(a["ndcg@10"], b["ndcg@10"])
    assert len(os.listdir(tmp_path / "b" / "logs")) == 2  # one log per run

    # an interruption (Ctrl-C) in the second epoch of the second run: one run is recorded, the second left a resume state
    from recbole.trainer import Trainer
    calls, train_epoch = [], Trainer._train_epoch

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return train_epoch(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(models, ["tiny"], seeds, config_file_list=[TINY_CONFIG], config_dict=shared, out_dir=str(tmp_path / "c"),
                threads=1)
    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)
    assert len(open(tmp_path / "c" / RUNS_FILE).readlines()) == 1
    resumed = compare(models, ["tiny"], seeds, config_file_list=[TINY_CONFIG], config_dict=shared,
                      out_dir=str(tmp_path / "c"), threads=1)["records"]
    assert len(resumed) == 1 and "resumed_from" in resumed[0]  # only the stopped run runs, from its last epoch
    everything = [json.loads(line) for line in open(tmp_path / "c" / RUNS_FILE)]
    for key, record in by_run(serial).items():
        assert by_run(everything)[key]["test"] == record["test"]  # the same numbers as the uninterrupted plan
    assert compare(models, ["tiny"], seeds, config_file_list=[TINY_CONFIG], config_dict=shared,
                   out_dir=str(tmp_path / "c"), jobs=2)["records"] == []  # all done: nothing runs again


def test_the_gpu_plan_parts_cover_every_runnable_row_once_with_the_baseline_in_each():
    from recbole_reason.variants import CATALOG, PARTS, PLAN, plan_part

    parts = {part: plan_part(part) for part in PARTS}
    assert all(rows[0] == "SASRec" for rows in parts.values())
    assert sorted(label for rows in parts.values() for label in rows[1:]) == sorted(set(PLAN) - {"SASRec"})
    assert plan_part("all") == PLAN and "R2ec-constant" in plan_part("r2ec")
    for label in PLAN:  # every control and inference-time row is in the part of the model it belongs to
        row = CATALOG[label]
        for other in (row.get("control_of"), row.get("from_run_of")):
            assert other is None or CATALOG[other]["part"] == row["part"]
    with pytest.raises(ValueError, match="unknown plan part"):
        plan_part("rearec,nope")


def test_relative_difference_against_a_zero_reference_is_not_a_number_in_the_table():
    from recbole_reason.tables import format_relative

    assert format_relative(0.0712) == "+7.1%" and format_relative(-0.05) == "-5.0%"
    assert format_relative(float("nan")) == "n/a" and format_relative(None) == "n/a"
