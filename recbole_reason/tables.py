"""The comparison's tables and figure, built from stored run records: it reads `runs.jsonl` (and the runs'
per-user files) and writes the tables and the bar chart; it never trains (the runs: `recbole_reason.compare`).

    from recbole_reason.tables import build_tables
    files, summary = build_tables("results/ml-100k", baseline="SASRec")   # run_compare.py --rebuild

Table: mean ± sample std over seeds for every metric of the run's config (`metrics` x `topk`), the best mean of
each column in bold (smallest for RecBole's smaller-is-better metrics), and for every model but the baseline the
p-value of a ONE-SIDED paired t-test over the seeds both ran, H1: the model is better than the baseline
(`alternative='greater'`, or `'less'` for smaller-is-better metrics). Below it, the paired tests over users of each
model against the baseline and against its control (Wilcoxon, paired t, bootstrap interval, relative difference).
A model that fails is a row with its error. Files: `comparison.md`, `.csv`, `.tex`, `_paired.csv` and the bar chart
of the valid metric (`comparison.png`, `.pdf`, `.svg`, `recbole_reason.figures`).
"""

import json
import math
import os
import warnings

import numpy as np

RUNS_FILE = "runs.jsonl"  # one JSON line per run, written by recbole_reason.compare
TABLE_STEM = "comparison"
DECIMALS = 4
PAIRED_MD_METRICS = ("ndcg@10", "recall@10")  # the Markdown table's per-user tests (the CSV holds every metric)


# -- statistics (also used by bench/run_bench.py) ------------------------------------------------------------------
def smaller_is_better(metric):
    """True for RecBole metrics where lower is better (MAE, RMSE, LogLoss, AveragePopularity, GiniIndex).
    `metric` as in a result dict: 'averagepopularity@10', 'rmse'."""
    from recbole.evaluator.register import smaller_metrics

    return metric.split("@")[0].lower() in smaller_metrics


def mean_std(values):
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def one_sided_paired_ttest(model_values, baseline_values, smaller_better=False):
    """p-value of the paired t-test of H0: no difference against H1: the model is BETTER than the baseline, i.e.
    mean(model - baseline) > 0 ('greater'), or < 0 for a smaller-is-better metric ('less'). Pairs are positions
    (one seed each). None with fewer than two pairs; nan when every difference is zero (no test possible)."""
    from scipy import stats

    model_values, baseline_values = np.asarray(model_values, float), np.asarray(baseline_values, float)
    if model_values.shape != baseline_values.shape:
        raise ValueError(f"paired t-test needs one baseline value per model value, got {model_values.shape} and "
                         f"{baseline_values.shape}")
    if len(model_values) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical pairs: scipy warns, p is still defined
        result = stats.ttest_rel(model_values, baseline_values, alternative="less" if smaller_better else "greater")
    return float(result.pvalue)


def format_relative(rel_diff):
    """A relative difference in percent; "n/a" where it is undefined (the reference's mean is 0)."""
    return "n/a" if rel_diff is None or math.isnan(rel_diff) else f"{100 * rel_diff:+.1f}%"


def format_p(p):
    if p is None:
        return "–"
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# -- records -> per-dataset tables ---------------------------------------------------------------------------------
def load_records(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def select_on_valid(records):
    """Rows of one `select` group (a model tuned over a grid, e.g. ReaRec's tau) -> extra records labelled with
    the group's name, copies of the member with the best mean validation score (the run's `valid_metric`) over
    its seeds, `selected` naming it. A group whose members are all controls of another group's members becomes
    that group's control. Groups with fewer than two members add nothing."""
    members = {}
    for r in records:
        if r.get("select") and "error" not in r and r.get("valid"):
            members.setdefault((r["dataset"], r["select"]), {}).setdefault(r["label"], []).append(r)
    group_of = {(dataset, label): group for (dataset, group), labels in members.items() for label in labels}
    extra = []
    for (dataset, group), labels in members.items():
        if len(labels) < 2:
            continue
        metric = str(next(iter(labels.values()))[0]["eval_setup"]["valid_metric"]).lower()
        sign = -1 if smaller_is_better(metric) else 1
        best = max(labels, key=lambda label: sign * np.mean([r["valid"].get(metric, -sign * np.inf) for r in labels[label]]))
        controls = {group_of.get((dataset, r.get("control_of"))) for runs in labels.values() for r in runs}
        for r in labels[best]:
            copy = {**r, "label": group, "selected": best, "select": None}
            copy.pop("control_of", None)
            if len(controls) == 1 and None not in controls:
                copy["control_of"] = next(iter(controls))
            extra.append(copy)
    return records + extra


def summarize(records, baseline=None, split="test", out_dir=None):
    """Per dataset: the metric columns and one row per model label (first-seen order) with mean, std, p-value and
    best flag per metric, its role (control of which model, member chosen on valid) and note; failed models carry
    their error. Of repeated runs of a (label, dataset, seed), the last successful one counts. With `out_dir` (where
    the runs' per-user files are) `paired` lists the per-user paired tests of every model against the baseline
    and against its control (`per_user.paired_over_seeds`), with the seed-level t-test of the same pair."""
    records = select_on_valid(records)
    summary = []
    for dataset in list(dict.fromkeys(r["dataset"] for r in records)):
        rows_of = [r for r in records if r["dataset"] == dataset]
        labels = list(dict.fromkeys(r["label"] for r in rows_of))
        latest = {}
        for r in rows_of:
            if "error" not in r and r.get(split):
                latest[(r["label"], r["seed"])] = r
        metrics = list(dict.fromkeys(m for r in latest.values() for m in r[split]))
        setups = {json.dumps(r.get("eval_setup"), sort_keys=True) for r in latest.values()}
        base = {seed: r[split] for (label, seed), r in latest.items() if label == baseline}
        rows = []
        for label in labels:
            runs = sorted((r for (lab, _), r in latest.items() if lab == label), key=lambda r: r["seed"])
            errors = [r for r in rows_of if r["label"] == label and "error" in r and (label, r["seed"]) not in latest]
            meta = runs[-1] if runs else {}
            row = {"label": label, "baseline": label == baseline, "seeds": [r["seed"] for r in runs],
                   "failed_seeds": sorted({r["seed"] for r in errors}), "error": errors[-1]["error"] if errors else None,
                   "control_of": meta.get("control_of"), "selected": meta.get("selected"), "note": meta.get("note"),
                   "metrics": {}}
            for metric in metrics:
                values = [r[split][metric] for r in runs if metric in r[split]]
                if not values:
                    continue
                mean, std = mean_std(values)
                cell = {"mean": mean, "std": std, "n": len(values), "p": None}
                if baseline is not None and label != baseline:
                    paired = [(r[split][metric], base[r["seed"]][metric]) for r in runs
                              if r["seed"] in base and metric in base[r["seed"]]]
                    if paired:
                        cell["p"] = one_sided_paired_ttest(*zip(*paired), smaller_better=smaller_is_better(metric))
                        cell["paired_seeds"] = len(paired)
                row["metrics"][metric] = cell
            rows.append(row)
        for metric in metrics:  # best per column, at the precision shown
            shown = {row["label"]: round(row["metrics"][metric]["mean"], DECIMALS) for row in rows if metric in row["metrics"]}
            if shown:
                best = (min if smaller_is_better(metric) else max)(shown.values())
                for row in rows:
                    if metric in row["metrics"]:
                        row["metrics"][metric]["best"] = shown[row["label"]] == best
        setup_of = {r["label"]: json.dumps(r.get("eval_setup"), sort_keys=True) for r in latest.values()}
        reference = setup_of.get(baseline) or max(setups, key=list(setup_of.values()).count) if setups else None
        table = {"dataset": dataset, "metrics": metrics, "rows": rows, "split": split, "baseline": baseline,
                 "mixed_setup": len(setups) > 1, "paired": [],
                 "odd_setup": sorted({label for label, setup in setup_of.items() if setup != reference})}
        if out_dir and split == "test":
            table["paired"] = _paired_tests(rows, latest, baseline, out_dir)
        summary.append(table)
    return summary


def _paired_tests(rows, latest, baseline, out_dir):
    """Per-user paired tests (pooled over seeds) of each model against the baseline and against its control."""
    from recbole_reason.per_user import USER_ID, load_per_user, paired_over_seeds

    def per_user_runs(label):
        return {seed: load_per_user(os.path.join(out_dir, r["per_user_file"])) for (lab, seed), r in latest.items()
                if lab == label and r.get("per_user_file") and os.path.isfile(os.path.join(out_dir, r["per_user_file"]))}

    pairs = [(row["label"], baseline, "baseline") for row in rows if baseline and row["label"] != baseline]
    pairs += [(row["control_of"], row["label"], "control") for row in rows if row["control_of"]]
    tests = []
    for model, reference, kind in pairs:
        model_runs, reference_runs = per_user_runs(model), per_user_runs(reference)
        if not model_runs or not reference_runs:
            continue
        for metric in [k for k in next(iter(model_runs.values())) if k != USER_ID]:
            if not all(metric in v for v in reference_runs.values()):
                continue
            smaller = smaller_is_better(metric)
            test = paired_over_seeds(model_runs, reference_runs, metric, alternative="less" if smaller else "greater")
            if test is None:
                continue
            seed_means = [(latest[(model, s)]["test"][metric], latest[(reference, s)]["test"][metric]) for s in test["seeds"]]
            test.update(model=model, reference=reference, kind=kind, metric=metric,
                        seed_ttest_p=one_sided_paired_ttest(*zip(*seed_means), smaller_better=smaller))
            tests.append(test)
    return tests


# -- writers -----------------------------------------------------------------------------------------------------
def _notes(table):
    notes = []
    if table["baseline"]:
        notes.append(f"p: one-sided paired t-test over seeds against {table['baseline']}, H1: the model is better "
                     "(greater mean; smaller for smaller-is-better metrics).")
    if table["mixed_setup"]:
        odd = ", ".join(table.get("odd_setup") or []) or "some rows"
        notes.append("WARNING: these runs do not share one evaluation setup (eval_args / metrics / topk / valid_metric / "
                     f"MAX_ITEM_LIST_LENGTH differ; {odd} differ from the baseline or the most common setup): those rows "
                     "are not comparable with the others. See eval_setup in runs.jsonl.")
    return notes


def _cell_text(cell, bold, plus_minus, p_text):
    text = f"{cell['mean']:.{DECIMALS}f}{plus_minus}{cell['std']:.{DECIMALS}f}"
    text = bold(text) if cell.get("best") else text
    return text + (p_text(format_p(cell["p"])) if cell.get("p") is not None else "")


def _model_text(row):
    roles = (["baseline"] if row["baseline"] else []) + ([f"control of {row['control_of']}"] if row.get("control_of") else [])
    roles += [f"= {row['selected']}, best on valid"] if row.get("selected") else []
    return row["label"] + (f" ({'; '.join(roles)})" if roles else "")


def _signed(value, digits=DECIMALS):
    return f"{value:+.{digits}f}"


def paired_markdown(table, metrics=PAIRED_MD_METRICS):
    """The per-user paired tests of a table as Markdown lines (the metrics of `metrics` that were tested)."""
    tests = [t for t in table.get("paired", []) if t["metric"] in metrics]
    pairs = list(dict.fromkeys((t["model"], t["reference"], t["kind"]) for t in tests))
    tests.sort(key=lambda t: (pairs.index((t["model"], t["reference"], t["kind"])), metrics.index(t["metric"])))
    if not tests:
        return []
    lines = ["", "**Paired tests over users** (per-user test values averaged over the seeds both ran, paired by user; "
             "one-sided, H1: the model is better than the reference; scipy's Wilcoxon signed-rank and paired t over "
             "users, percentile-bootstrap 95% interval of the mean difference; last column: paired t over seed means)",
             "", "| model | against | metric | seeds | users | rel. diff | mean diff [95% CI] | Wilcoxon p | t p (users) | t p (seeds) |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for t in tests:
        lines.append(f"| {t['model']} | {t['reference']}{' (control)' if t['kind'] == 'control' else ''} | {t['metric']} | "
                     f"{len(t['seeds'])} | {t['n']} | {format_relative(t['rel_diff'])} | {_signed(t['mean_diff'])} "
                     f"[{_signed(t['ci_low'])}, {_signed(t['ci_high'])}] | {format_p(t['wilcoxon_p'])} | "
                     f"{format_p(t['ttest_p'])} | {format_p(t['seed_ttest_p'])} |")
    return lines


def write_paired_csv(summary, path):
    import csv

    fields = ["dataset", "model", "reference", "kind", "metric", "seeds", "n", "mean_model", "mean_baseline",
              "mean_diff", "rel_diff", "ci_low", "ci_high", "wilcoxon_p", "ttest_p", "seed_ttest_p"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for table in summary:
            for test in table.get("paired", []):
                writer.writerow({**test, "dataset": table["dataset"], "seeds": " ".join(map(str, test["seeds"])),
                                 "seed_ttest_p": "" if test["seed_ttest_p"] is None else test["seed_ttest_p"]})


def _seeds_text(row):
    n_failed = len(row["failed_seeds"])
    return f"{len(row['seeds'])}" + (f" ({n_failed} failed)" if n_failed else "")


def to_markdown(summary, header=""):
    def escape(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [header] if header else []
    for table in summary:
        lines += ["", f"### {table['dataset']} ({table['split']})", ""] + [f"{note}" for note in _notes(table)] + [""]
        columns = table["metrics"] or ["result"]  # every run of the dataset failed: no metric is known
        lines.append("| model | seeds | " + " | ".join(columns) + " |")
        lines.append("|---|---:|" + "---:|" * len(columns))
        for row in table["rows"]:
            if not row["seeds"]:
                cells = [f"FAILED: {escape(row['error'])}"] + ["–"] * (len(columns) - 1)
            else:
                cells = [_cell_text(row["metrics"][m], lambda t: f"**{t}**", " ± ", lambda p: f" (p={p})")
                         if m in row["metrics"] else "–" for m in table["metrics"]]
            lines.append(f"| {escape(_model_text(row))} | {_seeds_text(row)} | " + " | ".join(cells) + " |")
        errors = [row for row in table["rows"] if row["seeds"] and row["error"]]
        lines += [""] + [f"- {row['label']} failed on seeds {row['failed_seeds']}: {escape(row['error'])}" for row in errors]
        notes = [row for row in table["rows"] if row.get("note")]
        lines += ["", "Settings that differ from the paper:"] + [f"- {row['label']}: {escape(row['note'])}" for row in notes] if notes else []
        lines += paired_markdown(table)
    return "\n".join(lines).rstrip() + "\n"


def to_csv_rows(summary):
    rows = []
    for table in summary:
        for row in table["rows"]:
            out = {"dataset": table["dataset"], "split": table["split"], "model": row["label"],
                   "baseline": table["baseline"] or "", "n_seeds": len(row["seeds"]),
                   "seeds": " ".join(map(str, row["seeds"])), "failed_seeds": " ".join(map(str, row["failed_seeds"])),
                   "error": row["error"] or ""}
            for metric in table["metrics"]:
                cell = row["metrics"].get(metric, {})
                out[f"{metric}_mean"] = cell.get("mean", "")
                out[f"{metric}_std"] = cell.get("std", "")
                out[f"{metric}_p"] = "" if cell.get("p") is None else cell["p"]
                out[f"{metric}_best"] = bool(cell.get("best", False))
            rows.append(out)
    return rows


def write_csv(summary, path):
    import csv

    rows = to_csv_rows(summary)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _latex_escape(text):
    for char, replacement in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                              ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(char, replacement)
    return text


def to_latex(summary):
    """One self-contained tabular per dataset (no packages beyond LaTeX itself)."""
    parts = []
    for table in summary:
        metrics = table["metrics"] or ["result"]
        lines = [r"\begin{table}[t]", r"\centering",
                 rf"\caption{{{_latex_escape(table['dataset'])} ({table['split']}): mean $\pm$ std over seeds"
                 + (rf"; p: one-sided paired t-test against {_latex_escape(table['baseline'])}" if table["baseline"] else "")
                 + "}", r"\begin{tabular}{l" + "r" * (len(metrics) + 1) + "}", r"\hline",
                 "Model & Seeds & " + " & ".join(_latex_escape(m) for m in metrics) + r" \\", r"\hline"]
        for row in table["rows"]:
            if not row["seeds"]:
                cells = [rf"\multicolumn{{{len(metrics)}}}{{l}}{{failed: {_latex_escape(str(row['error'])[:80])}}}"]
            else:
                cells = [_cell_text(row["metrics"][m], lambda t: rf"\textbf{{{t}}}", r"$\pm$",
                                    lambda p: rf" {{\scriptsize (p={_latex_escape(p)})}}")
                         if m in row["metrics"] else "--" for m in metrics]
            lines.append(f"{_latex_escape(_model_text(row))} & {_seeds_text(row)} & " + " & ".join(cells) + r" \\")
        lines += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def build_tables(out_dir, baseline=None, split="test", command=None):
    """Rebuild `comparison.md`, `.csv` and `.tex` in `out_dir` from every run in its `runs.jsonl`."""
    jsonl = os.path.join(out_dir, RUNS_FILE)
    records = load_records(jsonl)
    if not records:
        raise FileNotFoundError(f"No runs to tabulate: {jsonl} is missing or empty. Run a comparison first.")
    summary = summarize(records, baseline=baseline, split=split, out_dir=out_dir)
    seeds = sorted({r["seed"] for r in records})
    commits = sorted({r["commit"] for r in records if r.get("commit")})
    devices = sorted({r.get("device") or "not recorded" for r in records if "error" not in r})
    header = "\n".join(
        [f"## Comparison ({split} split)", ""]
        + ([f"- command: `{command}`"] if command else [])
        + [f"- seeds: {', '.join(map(str, seeds))}",
           f"- config files: {', '.join(sorted({f for r in records for f in r.get('config_files', [])})) or 'none'}",
           f"- commits: {', '.join(commits) or 'unknown'}",
           f"- device{'s' if len(devices) > 1 else ''}: {'; '.join(devices)}",
           "- cells: mean ± sample std over seeds; best mean of each column in **bold**"]
    )
    files = {"jsonl": jsonl}
    for ext, text in (("md", to_markdown(summary, header)), ("tex", to_latex(summary))):
        files[ext] = os.path.join(out_dir, f"{TABLE_STEM}.{ext}")
        with open(files[ext], "w", encoding="utf-8") as f:
            f.write(text)
    files["csv"] = os.path.join(out_dir, f"{TABLE_STEM}.csv")
    write_csv(summary, files["csv"])
    if any(table["paired"] for table in summary):
        files["paired_csv"] = os.path.join(out_dir, f"{TABLE_STEM}_paired.csv")
        write_paired_csv(summary, files["paired_csv"])
    if any(row["metrics"] for table in summary for row in table["rows"]):  # bar chart of the valid metric over seeds
        from recbole_reason.figures import comparison_figure, save_figure

        metric = next((str(r["eval_setup"]["valid_metric"]).lower() for r in records
                       if (r.get("eval_setup") or {}).get("valid_metric")), None)
        files.update(save_figure(comparison_figure(summary, metric), os.path.join(out_dir, TABLE_STEM)))
    return files, summary
