"""Comparison command: one-sided paired t-tests, the table (Markdown / CSV / LaTeX), failures, filling in parts."""

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

import run_compare
from conftest import TINY_CONFIG
from recbole_reason.cli import parse_setting
from recbole_reason.compare import cli_config_overrides, compare, device_name, normalize_models, parse_variant
from recbole_reason.tables import RUNS_FILE, build_tables, format_p, one_sided_paired_ttest, smaller_is_better


# -- the t-test direction, on hand-made numbers -------------------------------------------------------------------
def _by_hand(model, baseline):
    """p of H1 'mean(model - baseline) > 0' from the t statistic's formula."""
    d = np.asarray(model) - np.asarray(baseline)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return stats.t.sf(t, df=len(d) - 1)


def test_t_test_is_one_sided_towards_the_model_being_better():
    better = [0.310, 0.325, 0.318, 0.330]
    baseline = [0.300, 0.305, 0.310, 0.312]
    p = one_sided_paired_ttest(better, baseline)
    assert p == pytest.approx(_by_hand(better, baseline)) and p < 0.01
    # the same numbers the other way round: the model is worse, H1 (better) is not supported
    p_worse = one_sided_paired_ttest(baseline, better)
    assert p_worse > 0.99 and p + p_worse == pytest.approx(1.0)


def test_t_test_flips_for_smaller_is_better_metrics():
    lower = [0.80, 0.78, 0.82, 0.79]  # e.g. RMSE: lower is better
    baseline = [0.90, 0.91, 0.88, 0.93]
    assert smaller_is_better("rmse") and smaller_is_better("averagepopularity@10") and not smaller_is_better("ndcg@10")
    assert one_sided_paired_ttest(lower, baseline, smaller_better=True) == pytest.approx(_by_hand(baseline, lower))
    assert one_sided_paired_ttest(lower, baseline, smaller_better=True) < 0.01
    assert one_sided_paired_ttest(lower, baseline, smaller_better=False) > 0.99


def test_t_test_is_paired_not_independent():
    # a constant small gain on top of a large seed-to-seed spread: significant only when the seeds are paired
    baseline = [0.20, 0.30, 0.40, 0.25]
    model = [b + 0.01 + e for b, e in zip(baseline, (0.001, -0.001, 0.0005, 0.0))]
    assert one_sided_paired_ttest(model, baseline) < 0.001
    assert stats.ttest_ind(model, baseline, alternative="greater").pvalue > 0.4


def test_t_test_edge_cases():
    assert one_sided_paired_ttest([0.3], [0.2]) is None  # one seed: no test
    assert math.isnan(one_sided_paired_ttest([0.3, 0.4], [0.3, 0.4]))  # no difference at all
    assert format_p(None) == "–" and format_p(float("nan")) == "n/a" and format_p(0.0001) == "<0.001"
    with pytest.raises(ValueError, match="one baseline value per model value"):
        one_sided_paired_ttest([0.1, 0.2], [0.1])


# -- the table, from hand-made run records ----------------------------------------------------------------------------
def _record(label, seed, ndcg, pop, dataset="ml", **extra):
    return {"label": label, "model": label, "dataset": dataset, "seed": seed, "setup": "s",
            "test": {"ndcg@10": ndcg, "averagepopularity@10": pop}, "valid": {"ndcg@10": ndcg},
            "eval_setup": {"topk": [10]}, "config_files": ["/x/a.yaml"], **extra}


def _write_runs(folder, records):
    folder.mkdir(exist_ok=True)
    with open(folder / RUNS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_table_marks_the_best_per_column_tests_against_the_baseline_and_reports_failures(tmp_path):
    records = (
        [_record("SASRec", s, n, p) for s, n, p in ((1, 0.30, 50.0), (2, 0.31, 52.0), (3, 0.29, 51.0))]
        + [_record("Better", s, n, p) for s, n, p in ((1, 0.33, 60.0), (2, 0.34, 61.0), (3, 0.33, 62.0))]
        + [_record("Worse", s, n, p) for s, n, p in ((1, 0.25, 40.0), (2, 0.27, 41.0))]
        + [{"label": "Worse", "model": "Worse", "dataset": "ml", "seed": 3, "error": "RuntimeError: out of memory"}]
        + [{"label": "Broken", "model": "Broken", "dataset": "ml", "seed": s, "error": "ValueError: bad | setting"}
           for s in (1, 2, 3)]
    )
    _write_runs(tmp_path / "out", records)
    files, summary = build_tables(str(tmp_path / "out"), baseline="SASRec")
    rows = {row["label"]: row for row in summary[0]["rows"]}

    better = rows["Better"]["metrics"]["ndcg@10"]
    assert better["mean"] == pytest.approx(np.mean([0.33, 0.34, 0.33]))
    assert better["std"] == pytest.approx(np.std([0.33, 0.34, 0.33], ddof=1))
    assert better["best"] and better["p"] == pytest.approx(_by_hand([0.33, 0.34, 0.33], [0.30, 0.31, 0.29]))
    # average popularity: smaller is better, so the best is the lowest mean and "Better" is worse than the baseline
    assert rows["Worse"]["metrics"]["averagepopularity@10"]["best"]
    assert rows["Better"]["metrics"]["averagepopularity@10"]["p"] > 0.99
    assert rows["Worse"]["metrics"]["averagepopularity@10"]["p"] < 0.05  # paired over the 2 seeds both ran
    assert rows["Worse"]["metrics"]["ndcg@10"]["paired_seeds"] == 2 and rows["Worse"]["failed_seeds"] == [3]
    assert rows["SASRec"]["metrics"]["ndcg@10"]["p"] is None  # the baseline is not tested against itself
    assert rows["Broken"]["seeds"] == [] and "bad | setting" in rows["Broken"]["error"]

    md = open(files["md"]).read()
    assert "| SASRec (baseline) | 3 |" in md
    assert f"**{np.mean([0.33, 0.34, 0.33]):.4f} ± " in md and f"(p={format_p(better['p'])})" in md
    assert "| Worse | 2 (1 failed) |" in md and "Worse failed on seeds [3]: RuntimeError: out of memory" in md
    assert "| Broken | 0 (3 failed) | FAILED: ValueError: bad \\| setting |" in md  # a pipe cannot break the row
    assert "one-sided paired t-test" in md

    with open(files["csv"]) as f:
        table = {row["model"]: row for row in csv.DictReader(f)}
    assert float(table["Better"]["ndcg@10_p"]) == pytest.approx(better["p"]) and table["Better"]["ndcg@10_best"] == "True"
    assert table["SASRec"]["ndcg@10_p"] == "" and table["Broken"]["error"].startswith("ValueError")

    tex = open(files["tex"]).read()
    assert r"\textbf{0.3333$\pm$0.0058}" in tex and r"\multicolumn{2}{l}{failed: ValueError: bad | setting}" in tex
    assert "averagepopularity@10" in tex and tex.count(r"\begin{tabular}") == 1


def test_table_warns_when_runs_do_not_share_an_evaluation_setup(tmp_path):
    records = [_record("A", 1, 0.3, 1.0), _record("B", 1, 0.3, 1.0, eval_setup={"topk": [20]})]
    _write_runs(tmp_path / "out", records)
    files, summary = build_tables(str(tmp_path / "out"))
    assert summary[0]["mixed_setup"] and "WARNING" in open(files["md"]).read()
    with pytest.raises(FileNotFoundError, match="No runs to tabulate"):
        build_tables(str(tmp_path / "empty"))


def test_command_line_settings_read_values_as_recbole_reads_its_yaml():
    # plain YAML reads 1e-3 as a string; RecBole's loader (and so ours) reads a float, as in a config file
    assert parse_setting("learning_rate=1e-3") == ("learning_rate", 0.001)
    assert parse_setting("depths=[1, 2]") == ("depths", [1, 2])
    assert parse_setting("checkpoint_dir='/tmp/x'") == ("checkpoint_dir", "/tmp/x")
    assert parse_setting("test_recurrence=~") == ("test_recurrence", None)
    assert parse_setting("mode=prl") == ("mode", "prl")
    assert parse_setting("a=b=c") == ("a", "b=c")
    assert parse_variant("K=ReaRec learning_rate=1e-3")[2] == {"learning_rate": 0.001}
    assert cli_config_overrides(["--learning_rate=1e-3"]) == {"learning_rate": 0.001}
    for bad in ("learning_rate", "=1"):
        with pytest.raises(ValueError, match="a setting is key=value"):
            parse_setting(bad)


def test_models_variants_and_arguments_are_checked():
    assert parse_variant("ReaRec-PRL=ReaRec rearec_mode=prl reason_step=3") == (
        "ReaRec-PRL", "ReaRec", {"rearec_mode": "prl", "reason_step": 3})
    assert normalize_models(["SASRec", ("K1", "ReaRec", {"reason_step": 1}), {"model": "GRU4Rec"}]) == [
        {"label": "SASRec", "model": "SASRec", "config": {}}, {"label": "K1", "model": "ReaRec", "config": {"reason_step": 1}},
        {"label": "GRU4Rec", "model": "GRU4Rec", "config": {}}]
    # a catalogued label brings its settings and role (recbole_reason.variants)
    k0 = normalize_models(["ReaRec", "ReaRec-K0"])[1]
    assert k0["model"] == "ReaRec" and k0["config"]["reason_step"] == 0 and k0["control_of"] == "ReaRec"
    constant = normalize_models(["R2ec", "R2ec-constant"])[1]  # R2ec's reasoning-content control, same trained model
    assert constant["from_run_of"] == "R2ec" and constant["attributes"] == {"reasoning_content": "constant"}
    with pytest.raises(ValueError, match="add REG4Rec to the models"):
        normalize_models(["REG4Rec-noCORP"])
    with pytest.raises(ValueError, match="LABEL=MODEL"):
        parse_variant("ReaRec rearec_mode=prl")
    with pytest.raises(ValueError, match="unique"):
        normalize_models(["SASRec", "SASRec"])
    with pytest.raises(ValueError, match="baseline 'GRU4Rec' is not among the models"):
        compare(["SASRec"], ["tiny"], [1], baseline="GRU4Rec")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare(["SASRec"], ["tiny"], [1, 1])


def test_cli_passes_models_variants_and_settings_to_compare(monkeypatch, tmp_path):
    seen = {}

    def fake_compare(models, datasets, seeds, **kwargs):
        seen.update(models=models, datasets=datasets, seeds=seeds, **kwargs)
        (tmp_path / "t.md").write_text("table")
        return {"files": {"md": str(tmp_path / "t.md")}}

    monkeypatch.setattr("recbole_reason.compare.compare", fake_compare)
    run_compare.main(["--models", "SASRec,ReaRec-PRL", "--variant", "ReaRec-PRL=ReaRec rearec_mode=prl",
                      "--control", "SASRec=ReaRec-PRL", "--datasets", "tiny,ml-100k", "--seeds", "1,2",
                      "--baseline", "SASRec", "--jobs", "2", "--epochs=3", "--gpu_id=''"])
    assert seen["models"] == [{"label": "SASRec", "model": "SASRec", "config": {}, "control_of": "ReaRec-PRL"},
                              {"label": "ReaRec-PRL", "model": "ReaRec", "config": {"rearec_mode": "prl"}}]
    assert seen["jobs"] == 2
    assert seen["datasets"] == ["tiny", "ml-100k"] and seen["seeds"] == [1, 2] and seen["baseline"] == "SASRec"
    assert seen["config_dict"] == {"epochs": 3, "gpu_id": ""}  # recorded with every run, part of its setup
    with pytest.raises(ValueError, match="--key=value"):
        run_compare.main(["--models", "SASRec", "stray"])


# -- end to end on tiny data ---------------------------------------------------------------------------------------------
def test_compare_runs_baselines_and_plugin_models_fills_in_parts_and_reports_a_failed_model(tiny, tmp_path):
    out = str(tmp_path / "cmp")
    shared = {**{k: v for k, v in tiny().items() if k != "dataset"}, "train_batch_size": 1024, "MAX_ITEM_LIST_LENGTH": 5}
    first = compare(["SASRec", "NoSuchModel"], ["tiny"], [1, 2], config_file_list=[TINY_CONFIG], config_dict=shared,
                    baseline="SASRec", out_dir=out)
    failed = [r for r in first["records"] if "error" in r]
    assert len(first["records"]) == 4 and len(failed) == 2 and "Unknown model 'NoSuchModel'" in failed[0]["error"]

    # a second call adds a plugin model to the same table; what already ran is not run again
    second = compare([("ReaRec-K1", "ReaRec", {"reason_step": 1})], ["tiny"], [1, 2], config_file_list=[TINY_CONFIG],
                     config_dict=shared, baseline=None, out_dir=out)
    assert len(second["records"]) == 2
    again = compare(["SASRec"], ["tiny"], [1, 2], config_file_list=[TINY_CONFIG], config_dict=shared, out_dir=out)
    assert again["records"] == []

    runs = [json.loads(line) for line in open(f"{out}/{RUNS_FILE}")]
    ok = [r for r in runs if "error" not in r]
    assert len(ok) == 4 and {r["seed"] for r in ok} == {1, 2}
    # one protocol for all: the same config files and evaluation setup for the RecBole baseline and the plugin model
    assert len({json.dumps(r["eval_setup"], sort_keys=True) for r in ok}) == 1
    assert len({tuple(r["config_files"]) for r in ok}) == 1 and all(r["saved_model_file"] for r in ok)
    assert {r["device"] for r in ok} == {device_name("cpu")} and device_name("cpu").startswith("CPU (")

    # the CLI rebuilds the table from runs.jsonl, with the t-test against the baseline it names
    files = run_compare.main(["--rebuild", "--out_dir", out, "--baseline", "SASRec"])
    md = open(files["md"]).read()
    assert "| SASRec (baseline) | 2 |" in md and "| ReaRec-K1 | 2 |" in md and "(p=" in md
    assert f"- device: {device_name('cpu')}\n" in md  # failed runs ran on nothing: not listed
    assert "| NoSuchModel | 0 (2 failed) | FAILED: ValueError: Unknown model" in md
    sasrec_1 = next(r for r in ok if r["label"] == "SASRec" and r["seed"] == 1)["test"]
    assert f"{np.mean([r['test']['ndcg@10'] for r in ok if r['label'] == 'SASRec']):.4f}" in md
    assert 0.0 <= sasrec_1["ndcg@10"] <= 1.0
