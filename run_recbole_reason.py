"""Train and test a model with recbole-reason, as RecBole's run_recbole.py does.

    python run_recbole_reason.py --model=ReaRec --dataset=ml-100k
    python run_recbole_reason.py -m SASRec -d amazon-beauty --data_path=../shared/data --epochs=50

Any further `--key=value` is a RecBole config override (read by Config from the command line).
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="ReaRec", help="model name (plugin or RecBole)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated config files")
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
    keep_config_overrides(argv, args)
    from recbole_reason import run_recbole_reason

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    return run_recbole_reason(model=args.model, dataset=args.dataset, config_file_list=config_file_list)


def cli():
    """Bad input (unknown model, missing dataset, invalid setting) ends with one clear line, not a traceback."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as error:
        if os.environ.get("RECBOLE_REASON_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"error: {message}\n(set RECBOLE_REASON_TRACEBACK=1 to see the full traceback)")


if __name__ == "__main__":
    cli()
