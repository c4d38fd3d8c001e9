"""Per-batch speed of the plugin models against SASRec on one dataset: full-sort inference per 1,000 users and one
training step of each stage (forward + backward), with an optional operator profile. Untrained models: the cost
does not depend on the weights (REG4Rec's depends on its token table, built by the tokenizer here).

    python bench/profile_speed.py --dataset ml-100k --config_files bench/configs/cpu.yaml --threads 1
    python bench/profile_speed.py --dataset ml-100k --config_files bench/configs/gpu.yaml --profile REG4Rec

Ratios are to SASRec measured in the same process. On a shared CPU take the best of several rounds (--rounds).
"""

import argparse
import copy
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build(model_name, dataset, config_files, overrides):
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_reason.config import Config
    from recbole_reason.utils import create_dataset, get_model

    config = Config(model=model_name, dataset=dataset, config_file_list=config_files, config_dict=overrides)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    train_data, _, test_data = data_preparation(config, data)
    init_seed(config["seed"], True)
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    if model_name == "REG4Rec":
        from recbole_reason.data.mpq_tokenizer import build_item_tokens

        tokens = build_item_tokens(config, train_data._dataset)
        train_data._dataset.attach_item_tokens(tokens)
        model.set_item_tokens(tokens)
    return config, model, train_data, test_data


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(rounds, device, fn):
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def training_steps(name, model, batch):
    """name -> a function running one training step's forward + backward of each stage."""
    def run(loss_fn):
        def step():
            model.train()
            losses = loss_fn()
            total = sum(losses) if isinstance(losses, tuple) else losses
            total.backward()
            model.zero_grad(set_to_none=True)
        return step

    steps = {"supervised": run(lambda: model.calculate_loss(batch))}
    if name == "LARES":
        reference = copy.deepcopy(model).eval()
        steps["rpt"] = run(lambda: model.reinforcement_post_training_loss(batch, reference)[0])
    if name == "R2ec":
        model.set_dropout(0.0)
        model.refresh_item_table()
        steps["recpo"] = run(lambda: model.recpo_loss(batch)[0])
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="SASRec,LARES,R2ec,REG4Rec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=os.path.join(REPO, "bench", "configs", "cpu.yaml"))
    parser.add_argument("--data_path", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--users", type=int, default=512, help="users per full-sort batch")
    parser.add_argument("--train_batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--profile", default="", help="comma-separated models to profile (torch.profiler table)")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=value (values as in a YAML config file)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv
    overrides = {"data_path": args.data_path, "state": "ERROR", "show_progress": False,
                 "eval_batch_size": args.users, "train_batch_size": args.train_batch}
    from recbole_reason.cli import parse_setting
    overrides.update(parse_setting(item) for item in args.set)
    profiled = set(filter(None, args.profile.split(",")))
    rows, base = [], {}
    for name in args.models.split(","):
        config, model, train_data, test_data = build(name, args.dataset, args.config_files.split(), dict(overrides))
        device = config["device"]
        users = next(iter(test_data))[0].to(device)
        batch = next(iter(train_data)).to(device)
        model.eval()
        with torch.no_grad():
            model.full_sort_predict(users[:2])  # warm-up (R2ec: the item table, once per evaluation)
            infer = best_of(args.rounds, device, lambda: model.full_sort_predict(users))
        per_1k = 1000 * infer / len(users)
        steps = {stage: best_of(args.rounds, device, fn) for stage, fn in training_steps(name, model, batch).items()}
        if name == "SASRec":
            base = {"infer": per_1k, "step": steps["supervised"]}
        rows.append((name, per_1k, steps))
        if name in profiled:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            model.eval()
            with torch.no_grad(), profile(activities=activities) as prof:
                model.full_sort_predict(users)
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{name} full-sort profile ({len(users)} users)\n" + prof.key_averages().table(sort_by=sort, row_limit=20))
    print(f"\n{args.dataset}, {args.config_files}, device {device}, threads {torch.get_num_threads()}, "
          f"{len(users)} users per full-sort batch, train batch {len(batch)}, best of {args.rounds}")
    print("| model | full-sort s / 1k users (x SASRec) | training step s, fwd + bwd (x SASRec's step) |")
    print("|---|---:|---|")
    for name, per_1k, steps in rows:
        ratio = f" ({per_1k / base['infer']:.1f}x)" if base else ""
        cells = ", ".join(f"{stage} {t:.2f}" + (f" ({t / base['step']:.1f}x)" if base else "") for stage, t in steps.items())
        print(f"| {name} | {per_1k:.2f}{ratio} | {cells} |")


if __name__ == "__main__":
    main()
