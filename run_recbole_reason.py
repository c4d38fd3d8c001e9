"""Train and test a model with recbole-reason, as RecBole's run_recbole.py does.

    python run_recbole_reason.py --model=ReaRec --dataset=ml-100k
    python run_recbole_reason.py -m SASRec -d amazon-beauty --data_path=../shared/data --epochs=50
    python run_recbole_reason.py -m R2ec -d ml-100k --nproc 2 --gpu_id=0,1   # DDP: 2 processes (Gloo on the CPU if gpu_id='')
    python run_recbole_reason.py -m LARES -d ml-100k --resume=saved/LARES-Nov-23-2026_10-00-00.pth  # continue a run
    python run_recbole_reason.py -m ReaRec -d ml-100k --hyper --algo=bayes --max_evals=20  # tune (see run_hyper.py)

Any further `--key=value` is a RecBole config override (read by Config from the command line).
"""

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="ReaRec", help="model name (plugin or RecBole)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated config files")
    parser.add_argument("--nproc", type=int, default=1, help="DDP processes (GPUs from gpu_id with NCCL, else CPU with Gloo)")
    parser.add_argument("--resume", type=str, default=None,
                        help="checkpoint of an interrupted run (or its -resume.pth): continue it from its last epoch")
    parser.add_argument("--hyper", action="store_true",
                        help="tune instead of one run: run_hyper.py's options (--algo, --max_evals, --params_file, ...)")
    args, _ = parser.parse_known_args(argv)
    return args


def keep_config_overrides(argv, script_args):
    """RecBole's Config reads `--key=value` from sys.argv: leave it only those, not the script's own options."""
    argv = argv if argv is not None else sys.argv[1:]
    sys.argv = [sys.argv[0]] + [
        a for a in argv if a.startswith("--") and "=" in a and a.split("=")[0][2:] not in vars(script_args)
    ]


def main(argv=None):
    args = parse_args(argv)
    if args.hyper:  # the tuning route, same options and outputs as run_hyper.py (recbole_reason.hyper.tune)
        from run_hyper import main as tune_main

        argv = sys.argv[1:] if argv is None else argv
        return tune_main(["--model", args.model, "--dataset", args.dataset] + [a for a in argv if a != "--hyper"])
    keep_config_overrides(argv, args)
    from recbole_reason import run_recbole_reason

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    return run_recbole_reason(
        model=args.model, dataset=args.dataset, config_file_list=config_file_list, nproc=args.nproc,
        resume=args.resume,
    )


def cli():
    """Bad input (unknown model, missing dataset, invalid setting) ends with one clear line, not a traceback."""
    from recbole_reason.cli import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
