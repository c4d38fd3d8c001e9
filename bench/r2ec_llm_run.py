"""R2ec on SmolLM2-135M-Instruct (`r2ec_backbone: hf`) on a CPU-sized subset of ml-100k: metrics, time per step,
and users' reasoning texts.

    python bench/r2ec_llm_run.py --tag r2ec_smollm2_ml-100k_cpu

The subset (a CPU budget: the item table and every user's reasoning are language-model forwards): the
`--n_items` most popular movies of ml-100k, then the first `--n_users` users by user id with at least 8
interactions on them (chosen by id, not by any result), histories of the last `--history` movies. RecBole's
leave-one-out split, full ranking over the subset's catalogue, RecBole's evaluator. Stages, with R2ec's own losses:
zero-shot (the pretrained model, adapters at zero), `--warmup_steps` warm-up steps (`R2ec.calculate_loss`: greedy
reasoning then the in-batch item softmax + the LM loss), `--recpo_steps` RecPO steps (`R2ec.recpo_loss`, token and
item gradients balanced and clipped to 1.0 as `R2ecTrainer`). Popularity (RecBole's Pop) on the same split is the
reference a recommender must beat. Writes bench/results/<tag>.json and .md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import pandas as pd
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from recbole.data import data_preparation  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_reason import create_dataset, get_model, get_trainer  # noqa: E402
from recbole_reason.compare import device_name  # noqa: E402
from recbole_reason.config import Config  # noqa: E402
from recbole_reason.model.rl import balanced_gradients  # noqa: E402

METRICS = ["ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr@10"]


def ml100k_folder():
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def write_subset(root, name, n_items, n_users, min_inter=8):
    src = ml100k_folder()
    inter = pd.read_csv(os.path.join(src, "ml-100k.inter"), sep="\t")
    item = pd.read_csv(os.path.join(src, "ml-100k.item"), sep="\t")
    top = inter["item_id:token"].value_counts().index[:n_items]
    inter = inter[inter["item_id:token"].isin(top)]
    counts = inter["user_id:token"].value_counts()
    users = sorted(int(u) for u in counts[counts >= min_inter].index)[:n_users]
    inter = inter[inter["user_id:token"].isin(users)]
    os.makedirs(os.path.join(root, name), exist_ok=True)
    inter.to_csv(os.path.join(root, name, f"{name}.inter"), sep="\t", index=False)
    item[item["item_id:token"].isin(inter["item_id:token"])].to_csv(os.path.join(root, name, f"{name}.item"),
                                                                    sep="\t", index=False)
    return users, len(inter), inter["item_id:token"].nunique()


def popularity(settings, seed):
    """RecBole's Pop on the R2ec runs' split: a general model does not get properties/overall.yaml (sequential
    models only), so its split (leave-one-out by time, per user, full ranking) and metrics are set here."""
    overrides = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                 "metrics": ["Recall", "NDCG", "Hit", "MRR"], "topk": [10, 20], "valid_metric": "NDCG@10",
                 "train_neg_sample_args": None}
    config = Config(model="Pop", config_dict={**{k: v for k, v in settings.items() if not k.startswith("r2ec")},
                                              **overrides})
    init_seed(seed, True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    trainer = get_trainer(config["MODEL_TYPE"], "Pop")(config, get_model("Pop")(config, train_data._dataset))
    trainer.fit(train_data, saved=False, show_progress=False)
    return {split: _metrics(trainer.evaluate(d, load_best_model=False, show_progress=False))
            for split, d in (("valid", valid_data), ("test", test_data))}


class Clock:
    """Wall and process CPU seconds of a block (the machine is shared: CPU seconds are the honest cost)."""

    def __enter__(self):
        self.wall, self.cpu = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.time() - self.wall, time.process_time() - self.cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="r2ec_smollm2_ml-100k_cpu")
    parser.add_argument("--n_items", type=int, default=300)
    parser.add_argument("--n_users", type=int, default=40)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--reason_len", type=int, default=20)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--warmup_batch", type=int, default=8)
    parser.add_argument("--recpo_steps", type=int, default=5)
    parser.add_argument("--recpo_batch", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--recpo_lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--explain", type=int, default=3)
    parser.add_argument("--pop_only", action="store_true", help="only recompute the Pop row of an existing record")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    sys.argv = sys.argv[:1]  # RecBole's Config would read the script's own options as config overrides
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    root = tempfile.mkdtemp(prefix="r2ec_llm_")
    name = f"ml-100k-top{args.n_items}-u{args.n_users}"
    users, n_inter, n_items = write_subset(root, name, args.n_items, args.n_users)
    settings = {
        "dataset": name, "data_path": root, "checkpoint_dir": os.path.join(root, "saved"), "seed": args.seed,
        "state": "ERROR", "show_progress": False, "gpu_id": "",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                     "item": ["item_id", "movie_title", "release_year", "class"]},
        "MAX_ITEM_LIST_LENGTH": args.history, "train_batch_size": args.warmup_batch, "eval_batch_size": 64,
        "r2ec_backbone": "hf", "r2ec_max_reason_len": args.reason_len, "r2ec_group_size": args.group_size,
        "r2ec_warmup_candidates": "in_batch", "recpo_item_candidates": "in_batch", "r2ec_item_batch_size": 64, "r2ec_lm_positions": 256,
        "r2ec_gen_temperature": 1.0, "r2ec_gen_top_k": 50,
    }
    record = {"command": command, "device": device_name("cpu"),
              "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "seed": args.seed, "args": vars(args),
              "subset": {"name": name, "users": users, "interactions": n_inter, "items": n_items},
              "stages": {}, "steps": {}}

    def save():
        os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
        with open(os.path.join(REPO, "bench", "results", f"{args.tag}.json"), "w") as f:
            json.dump(record, f, indent=1)
        write_markdown(record, os.path.join(REPO, "bench", "results", f"{args.tag}.md"))

    if args.pop_only:  # recompute the Pop reference of an existing record (same subset and split)
        with open(os.path.join(REPO, "bench", "results", f"{args.tag}.json")) as f:
            record = json.load(f)
        record["stages"]["Pop"] = popularity(settings, args.seed)
        record.setdefault("pop_command", command)
        save()
        return
    record["stages"]["Pop"] = popularity(settings, args.seed)

    config = Config(model="R2ec", config_dict=settings)
    init_seed(args.seed, True)
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    with Clock() as load:
        model = get_model("R2ec")(config, train_data._dataset)
    record["backbone"] = model.backbone.describe()
    record["steps"]["load_model"] = {"wall_s": load.wall, "cpu_s": load.cpu}
    trainer = get_trainer(config["MODEL_TYPE"], "R2ec")(config, model)

    def evaluate(stage, splits=("valid",), content="generated"):
        model.set_reasoning_content(content)
        out = {}
        for split in splits:
            with Clock() as clock:
                out[split] = _metrics(trainer.evaluate(valid_data if split == "valid" else test_data,
                                                       load_best_model=False, show_progress=False))
            record["steps"].setdefault(f"evaluate_{split}", []).append({"wall_s": clock.wall, "cpu_s": clock.cpu})
        model.set_reasoning_content("generated")
        record["stages"][stage] = out
        save()
        print(stage, out, flush=True)

    evaluate("zero-shot", ("valid", "test"))
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.Adam(params, lr=args.lr)
    losses = []
    batches = iter(train_data)
    model.train()
    for step in range(args.warmup_steps):
        batch = next(batches)
        with Clock() as clock:
            rec_loss, lm_loss = model.calculate_loss(batch)
            optimizer.zero_grad()
            (rec_loss + lm_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        losses.append({"rec": rec_loss.item(), "lm": lm_loss.item()})
        record["steps"].setdefault("warmup_step", []).append({"wall_s": clock.wall, "cpu_s": clock.cpu})
        print("warmup", step, losses[-1], round(clock.cpu, 1), flush=True)
    record["warmup_losses"] = losses
    evaluate("warm-up", ("valid",))

    optimizer = torch.optim.Adam(params, lr=args.recpo_lr)
    model.train()
    model.set_dropout(0.0)
    model.refresh_item_table()
    stats = []
    batches = iter(train_data)
    for step in range(args.recpo_steps):
        batch = next(batches)[: args.recpo_batch]
        with Clock() as clock:
            optimizer.zero_grad()
            (token_loss, item_loss), step_stats = model.recpo_loss(batch)
            norms = balanced_gradients((token_loss, item_loss), model.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        step_stats.update(token_loss=token_loss.item(), item_loss=item_loss.item(), token_grad_norm=norms[0],
                          item_grad_norm=norms[1])
        stats.append(step_stats)
        record["steps"].setdefault("recpo_step", []).append({"wall_s": clock.wall, "cpu_s": clock.cpu})
        print("recpo", step, step_stats, round(clock.cpu, 1), flush=True)
    record["recpo_stats"] = stats
    evaluate("RecPO", ("valid", "test"))
    evaluate("RecPO, random reasoning (control)", ("test",), content="random")

    with Clock() as clock:
        explained = model.explain(test_data.dataset, [str(u) for u in users[: args.explain]], topk=5)
    record["explanations"] = explained
    record["steps"]["explain"] = {"wall_s": clock.wall, "cpu_s": clock.cpu}
    record["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    record["load_average"] = os.getloadavg()
    save()


def _metrics(result):
    return {k: float(v) for k, v in result.items() if k in METRICS}


def write_markdown(record, path):
    lines = [f"# R2ec on SmolLM2-135M-Instruct, {record['subset']['name']} (CPU)", "",
             f"Command: `{record['command']}`  ", f"Device: {record['device']} (CPU figures; the machine was shared "
             f"with other jobs: CPU seconds are this process's own)  ", f"Commit: {record['commit']}, seed {record['seed']} "
             "(one seed: a CPU demonstration of the pipeline, not a quality claim)  ",
             f"Backbone: {record.get('backbone', '')}", "",
             f"Subset: the {record['args']['n_items']} most popular ml-100k movies, then the first "
             f"{record['args']['n_users']} users by id with >= 8 interactions on them: {record['subset']['interactions']} "
             f"interactions, {record['subset']['items']} items; histories of {record['args']['history']}; reasoning "
             f"budget {record['args']['reason_len']} tokens. Why: every item of the table and every user's reasoning is a "
             "135M-parameter forward on the CPU.", "",
             "| stage | split | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for stage, splits in record["stages"].items():
        for split, values in splits.items():
            lines.append(f"| {stage} | {split} | " + " | ".join(f"{values.get(m, float('nan')):.4f}" for m in METRICS) + " |")
    lines += ["", "Time (CPU seconds of this process, mean per call; wall seconds in brackets):", ""]
    for step, values in record["steps"].items():
        values = values if isinstance(values, list) else [values]
        cpu = sum(v["cpu_s"] for v in values) / len(values)
        wall = sum(v["wall_s"] for v in values) / len(values)
        lines.append(f"- {step}: {cpu:.1f} s ({wall:.1f} s wall) x {len(values)}")
    if record.get("warmup_losses"):
        lines += ["", "Warm-up losses (rec, lm) per step: " + ", ".join(f"({l['rec']:.3f}, {l['lm']:.3f})" for l in record["warmup_losses"])]
    if record.get("recpo_stats"):
        keys = ["reward", "reward_spread", "reasoning_len", "stopped_at_ans", "token_grad_norm", "item_grad_norm"]
        lines += ["", "RecPO per step: " + "; ".join(", ".join(f"{k} {s[k]:.4g}" for k in keys if k in s)
                                                  for s in record["recpo_stats"])]
    for e in record.get("explanations", []):
        lines += ["", f"### User {e['user']}", f"- history: {' | '.join(e['history'])}",
                  f"- reasoning: {' '.join(e['reasoning'])!r}", f"- top-5: {' | '.join(e['top_items'])}",
                  f"- target: {e['target']}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
