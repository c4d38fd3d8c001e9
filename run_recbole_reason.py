"""Train and test a model with recbole-reason, as RecBole's run_recbole.py does.

    python run_recbole_reason.py --model=ReaRec --dataset=ml-100k
    python run_recbole_reason.py -m SASRec -d amazon-beauty --data_path=../shared/data --epochs=50
    python run_recbole_reason.py -m R2ec -d ml-100k --nproc 2 --gpu_id=0,1   # DDP: 2 processes (Gloo on the CPU if gpu_id='')
    python run_recbole_reason.py -m LARES -d ml-100k --resume=saved/LARES-Nov-23-2026_10-00-00.pth  # continue a run
    python run_recbole_reason.py -m ReaRec -d ml-100k --hyper --algo=bayes --max_evals=20  # tune (see run_hyper.py)
    python run_recbole_reason.py --recommend saved/ReaRec-x.pth --users 196,186 --k 10     # use a trained model
    python run_recbole_reason.py --recommend saved/R2ec-x.pth --users 196 --output recs.json --data_path=../shared/data

Any further `--key=value` is a RecBole config override (read by Config from the command line).
"""

import argparse
import sys

from recbole_reason.cli import keep_config_overrides


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
    recommend = parser.add_argument_group("use a trained model (no training)")
    recommend.add_argument("--recommend", type=str, default=None, metavar="CHECKPOINT",
                           help="a trained checkpoint (.pth): print the top-k items for --users")
    recommend.add_argument("--users", type=str, default=None, help="comma-separated external user ids, e.g. 196,186")
    recommend.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    recommend.add_argument("--keep_history", action="store_true", help="allow items the user already interacted with")
    recommend.add_argument("--output", type=str, default=None, help="also write the recommendations to a .csv or .json")
    args, _ = parser.parse_known_args(argv)
    return args


def recommend_main(args, argv):
    """--recommend: load the checkpoint (any further --key=value is an evaluation setting, e.g. --data_path=...),
    print each user's top-k items with their titles (and R2ec's reasoning), optionally write them to --output."""
    from recbole_reason.compare import cli_config_overrides
    from recbole_reason.inference import format_recommendations, recommend_from_checkpoint, write_recommendations

    argv = sys.argv[1:] if argv is None else argv
    own = {f"--{name}" for name in vars(args)}
    settings = cli_config_overrides([a for a in argv if a.startswith("--") and "=" in a and a.split("=")[0] not in own])
    sys.argv = sys.argv[:1]  # the settings reach the stored config through config_dict, not Config's argv reader
    users = [user.strip() for user in (args.users or "").split(",") if user.strip()]
    if not users:
        raise ValueError("--recommend needs --users: comma-separated external user ids, e.g. --users 196,186")
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise ValueError(f"--output {args.output}: the file name must end in .csv or .json")
    recommendations = recommend_from_checkpoint(args.recommend, users, k=args.k, keep_history=args.keep_history,
                                                config_dict=settings)
    print(format_recommendations(recommendations))
    if args.output:
        print("written:", write_recommendations(recommendations, args.output))
    return recommendations


def main(argv=None):
    args = parse_args(argv)
    if args.recommend:
        return recommend_main(args, argv)
    if args.hyper:  # the tuning route, same options and outputs as run_hyper.py (recbole_reason.hyper.tune)
        from recbole_reason.hyper import main as tune_main

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
