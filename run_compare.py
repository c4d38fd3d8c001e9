"""Compare models (plugin and RecBole baselines) over seeds on one or more datasets, with paired t-tests.

    python run_compare.py --models SASRec,ReaRec,LARES --datasets ml-100k --seeds 2020,2021,2022 \\
        --baseline SASRec --config_files my.yaml --out_dir results/ml-100k --data_path=../shared/data
    python run_compare.py --models SASRec,ReaRec-PRL --variant "ReaRec-PRL=ReaRec rearec_mode=prl" ...
    python run_compare.py --models SASRec,ReaRec,ReaRec-K0 --jobs 3 ...              # catalogued controls, 3 at once
    python run_compare.py --rebuild --out_dir results/ml-100k --baseline SASRec     # tables only, no runs

Every model runs with the same config files and `--key=value` overrides; only the seed changes between runs
(and a variant's own settings). Runs are appended to <out_dir>/runs.jsonl (a run already there is skipped,
unless --rerun; an interrupted one resumes from its last epoch), each with its per-user test values in
<out_dir>/per_user/, and <out_dir>/comparison.{md,csv,tex} and comparison_paired.csv (per-user paired tests against
the baseline and each model's control) are rebuilt from all of them. Labels such as ReaRec-K0, LARES-T1 and
REG4Rec-noCORP are the named variants and controls of recbole_reason/variants.py.
"""

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "-m", default=None, help="comma-separated model names or --variant labels")
    parser.add_argument("--datasets", "-d", default="ml-100k", help="comma-separated dataset names")
    parser.add_argument("--seeds", default="2020,2021,2022", help="comma-separated seeds (one paired run each)")
    parser.add_argument("--baseline", default=None, help="label every other model is t-tested against (e.g. SASRec)")
    parser.add_argument("--variant", action="append", default=[],
                        help="'LABEL=MODEL key=value ...': a model with its own settings (repeatable)")
    parser.add_argument("--control", action="append", default=[],
                        help="'CONTROL=MODEL': the label CONTROL is the no-reasoning control of MODEL (repeatable; "
                             "catalogued variants such as ReaRec-K0 know theirs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process and log")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run with --jobs (default: cores / jobs)")
    parser.add_argument("--config_files", default=None, help="space-separated config files, shared by every run")
    parser.add_argument("--out_dir", default="compare_results", help="runs.jsonl and the tables go here")
    parser.add_argument("--split", default="test", choices=["test", "valid"], help="which results the table shows")
    parser.add_argument("--rerun", action="store_true", help="run again what runs.jsonl already holds")
    parser.add_argument("--rebuild", action="store_true", help="only rebuild the tables from runs.jsonl")
    return parser.parse_known_args(argv)


def main(argv=None):
    args, rest = parse_args(argv)
    command = "python run_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # the settings reach every run through config_dict (recorded), not Config's argv reader
    from recbole_reason.compare import cli_config_overrides, compare, normalize_models, parse_variant
    from recbole_reason.tables import build_tables

    config_dict = cli_config_overrides(rest)

    if args.rebuild:
        files, _ = build_tables(args.out_dir, baseline=args.baseline, split=args.split, command=command)
    else:
        variants = {label: {"label": label, "model": model, "config": overrides}
                    for label, model, overrides in map(parse_variant, args.variant)}
        names = [name.strip() for name in (args.models or "").split(",") if name.strip()]
        if not names and not variants:
            raise ValueError("No models: pass --models SASRec,ReaRec (and/or --variant 'LABEL=MODEL key=value').")
        models = normalize_models([variants.pop(name, name) for name in names] + list(variants.values()))
        for text in args.control:
            control, _, of = text.partition("=")
            found = [m for m in models if m["label"] == control]
            if not of or not found:
                raise ValueError(f"--control {text!r}: give CONTROL=MODEL with CONTROL among the models")
            found[0]["control_of"] = of
        files = compare(
            models, [d.strip() for d in args.datasets.split(",") if d.strip()],
            [int(s) for s in args.seeds.split(",") if s.strip()],
            config_file_list=args.config_files.split() if args.config_files else None, config_dict=config_dict,
            baseline=args.baseline, out_dir=args.out_dir, split=args.split, rerun=args.rerun, command=command,
            jobs=args.jobs, threads=args.threads,
        )["files"]
    print(open(files["md"], encoding="utf-8").read())
    print("written:", ", ".join(files.values()))
    return files


def cli():
    """Bad input (unknown option value, missing runs file) ends with one clear line, not a traceback; a model that
    fails during a run is a row of the table instead."""
    from recbole_reason.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
