"""Does RecPO's relabelling choose its item-loss rollout with the target known? (issue 18)

    python bench/r2ec_relabel_hindsight.py --checkpoint_dir bench/results/r2ec_v7_warmup_converged_ml-100k_cpu/saved/2021 \
        --seed 2021 --batches 4 --set MAX_ITEM_LIST_LENGTH=10 train_batch_size=512 r2ec_sim_temperature=0.1 \
        r2ec_max_reason_len=4 r2ec_gen_temperature=1.0

From a saved R2ec (tiny backbone), on the first `--batches` training batches: K rollouts per user, their fused
rewards and the relabelled (top-`r2ec_relabel_topk` by advantage) rollouts, from `R2ec.recpo_rollouts` as RecPO's
step takes them. Per rollout kind (relabelled, the other K - 1, greedy), the share of the reasoning's attribute tokens that are attributes
of the user's target item, and how often the reasoning names the target's item token. The relabelled rollout is the
one whose reasoning ranked the target highest; if its reasoning names the target's attributes more often than the
others', the relabelled item loss teaches the item head to follow reasoning that was picked with the answer known,
which greedy evaluation cannot pick. Appends one JSON line to bench/results/<tag>.jsonl.
"""

import argparse
import json
import os
import sys

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", required=True, help="folder whose oldest R2ec-*.pth is the model to probe")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tag", default="r2ec_relabel_hindsight_ml-100k_cpu")
    parser.add_argument("--set", nargs="*", default=[], help="key=value config overrides (the checkpoint's run's)")
    args = parser.parse_args()
    command = "python bench/r2ec_relabel_hindsight.py " + " ".join(sys.argv[1:])
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)}
    sys.argv = sys.argv[:1]
    from recbole.utils import init_seed

    from recbole_reason.compare import device_name, git_commit, saved_checkpoints
    from recbole_reason.config import Config
    from recbole_reason.quick_start import _build

    torch.set_num_threads(1)
    config = Config(model="R2ec", dataset="ml-100k", config_file_list=[os.path.join(REPO, "bench/configs/cpu.yaml")],
                    config_dict={**overrides, "seed": args.seed, "checkpoint_dir": args.checkpoint_dir,
                                 "save_resume_state": False, "state": "ERROR"})
    init_seed(args.seed, config["reproducibility"])
    _, (train_data, _, _), model, trainer = _build(config)
    checkpoint = saved_checkpoints(args.checkpoint_dir, "R2ec", "train R2ec first")[0]
    trainer.load_model_weights(checkpoint)
    model.set_dropout(0.0)
    model.refresh_item_table()
    vocab, k = model.vocab, model.group_size
    attr_lo, attr_hi = vocab.attr_offset, vocab.attr_offset + len(vocab.attr_global)

    def target_shares(tokens, targets):
        """tokens [b, ..., T]: share of each reasoning's attribute tokens in the target's own prompt, and whether it
        names the target's item token."""
        own = model.backbone.item_prompt[targets].view(len(targets), *([1] * (tokens.dim() - 1)), -1)
        is_attr = (tokens >= attr_lo) & (tokens < attr_hi)
        hits = (tokens[..., None] == own).any(-1) & is_attr
        names = (tokens == (vocab.item_offset + targets).view(-1, *([1] * (tokens.dim() - 1)))).any(-1)
        return hits.sum(-1).float() / is_attr.sum(-1).clamp(min=1), names.float()

    sums = {f"{kind}_{what}": 0.0 for kind in ("relabelled", "others", "greedy") for what in ("attr_share", "names_target")}
    users = 0
    with torch.no_grad():
        for index, interaction in enumerate(train_data):
            if index == args.batches:
                break
            targets = interaction[model.POS_ITEM_ID]
            b = len(targets)
            rollouts = model.recpo_rollouts(interaction)
            chosen = rollouts.relabel.bool()
            share, names = target_shares(rollouts.reasoning.view(b, k, -1), targets)
            greedy_share, greedy_names = target_shares(model.generate_reasoning(rollouts.prompt)[0], targets)
            for kind, mask in (("relabelled", chosen), ("others", ~chosen)):
                sums[f"{kind}_attr_share"] += share[mask].sum().item() / mask.sum(1)[0].item()
                sums[f"{kind}_names_target"] += names[mask].sum().item() / mask.sum(1)[0].item()
            sums["greedy_attr_share"] += greedy_share.sum().item()
            sums["greedy_names_target"] += greedy_names.sum().item()
            users += b
    record = {"seed": args.seed, "checkpoint": checkpoint, "users": users, "group_size": k,
              **{name: round(value / users, 4) for name, value in sums.items()},
              "overrides": overrides, "command": command, "commit": git_commit(), "device": device_name()}
    print(json.dumps(record), flush=True)
    with open(os.path.join(REPO, "bench", "results", f"{args.tag}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
