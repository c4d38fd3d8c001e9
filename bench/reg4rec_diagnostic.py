"""REG4Rec diagnostic (issue 15): the review's numbers, so that a change can be judged the same way.

    python bench/reg4rec_diagnostic.py --dataset ml-100k --sft_steps 100 --label after --out bench/results/x.json
    PYTHONPATH=/path/to/old/checkout python bench/reg4rec_diagnostic.py ...   # the same numbers for older code

It only uses what every REG4Rec version has (the trainer's `post_training_loss`, `crss_order`, `_crss_choice`,
`beam_search`), so it runs on the code before and after a change. On the supervised model (`--checkpoint`, or
`--sft_steps` Adam steps from scratch) and one batch of validation users it prints:
- PARS ratio at identical weights (pi_old a copy of the policy): std, mean |log ratio|, share outside the clip range,
  as the trainer computes them (its own defaults: refresh, dropout);
- PARS rollouts: target-hit rate (the path is the target item), reward std within groups, correlation of the
  advantages with the target-free Step-Consistency term and with the target's Step-Hit term, MSRA's target weight;
- CRSS: share of samples whose training order starts with the beam's root codebook, and the first-step survival of
  the target's token in the beam (rank < beam_size in the root codebook; CORP not applied), overall and by agreement;
- CORP: share of items it ranks below every item it left untouched, for every user (`--corp_beam` beams, wide
  enough that the beam without CORP reaches every item on small data).
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

from recbole.data import data_preparation
from recbole.utils import init_seed

from recbole_reason import Config, create_dataset
from recbole_reason.data import mpq_tokenizer as mpq
from recbole_reason.model.sequential_recommender.reg4rec import REG4Rec, UNREACHED, DecodingCache
from recbole_reason.trainer import reg4rec_trainer
from recbole_reason.trainer.reg4rec_trainer import REG4RecTrainer


def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def corp_buried_share(model, item_seq, item_seq_len, corp_beam):
    """Items CORP ranks below every item it left untouched, for every user, among the items the beam without CORP
    reaches for every user: (share, number of such reached items)."""
    model.beam_size, previous = corp_beam, model.beam_size
    try:
        on = model.beam_search(item_seq, item_seq_len)
        off = model.beam_search(item_seq, item_seq_len, corp="off")
    finally:
        model.beam_size = previous
    reached_off = off > UNREACHED / 2
    reached_on = on > UNREACHED / 2
    untouched = reached_on & ((on - off).abs() < 1e-4)
    floor = torch.where(untouched, on, torch.full_like(on, float("inf"))).min(1, keepdim=True).values
    buried = reached_off & (~reached_on | (on < floor))
    always_reached = reached_off.all(0)
    always_reached[0] = False
    n = int(always_reached.sum())
    return (float((buried.all(0) & always_reached).sum()) / n if n else float("nan")), n


def correlation(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--config_files", default="")
    parser.add_argument("--set", nargs="*", default=[], help="key=value config overrides")
    parser.add_argument("--checkpoint", default=None, help="a REG4Rec checkpoint (else --sft_steps from scratch)")
    parser.add_argument("--sft_steps", type=int, default=100)
    parser.add_argument("--sft_lr", type=float, default=3e-3)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--pars_batches", type=int, default=2)
    parser.add_argument("--corp_beam", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None, help="append the numbers as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config_dict = {"seed": args.seed, "show_progress": False, "state": "ERROR"}
    if args.data_path:
        config_dict["data_path"] = args.data_path
    for item in args.set:
        key, value = item.split("=", 1)
        config_dict[key] = parse_value(value)
    files = [f for f in args.config_files.split(",") if f]
    sys.argv = sys.argv[:1]
    config = Config(model="REG4Rec", dataset=args.dataset, config_file_list=files, config_dict=config_dict)
    init_seed(args.seed, True)
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    started = time.time()
    tokens = mpq.build_item_tokens(config, train_data._dataset)
    train_data._dataset.attach_item_tokens(tokens)
    init_seed(args.seed, True)
    model = REG4Rec(config, train_data._dataset)
    model.set_item_tokens(tokens)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.sft_lr)
        model.train()
        step = 0
        while step < args.sft_steps:
            for batch in train_data:
                loss = model.calculate_loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step >= args.sft_steps:
                    break
    train_batches = iter(train_data)

    # -- PARS at identical weights --------------------------------------------------------------------------
    trainer = REG4RecTrainer(config, model)
    trainer.stage = trainer.post_stage
    trainer.train_dataset = train_data._dataset
    trainer.reference_model = copy.deepcopy(model).eval()
    trainer.old_model = copy.deepcopy(model).eval()
    seen = {"ratio": [], "advantage": [], "consistency": [], "step_hit": [], "hit": [], "reward": []}
    clipped, msra = reg4rec_trainer.clipped_policy_loss, reg4rec_trainer.msra_rewards

    def spy_clip(logp, old_logp, advantages, clip_eps=0.2):
        seen["ratio"].append(torch.exp(logp - old_logp).detach())
        seen["advantage"].append(advantages.detach().flatten())
        return clipped(logp, old_logp, advantages, clip_eps)

    def spy_msra(*a, **k):
        rewards, terms = msra(*a, **k)
        seen["reward"].append(rewards.detach())
        seen["consistency"].append(terms["step_consistency"].detach())
        seen["step_hit"].append(terms["step_hit"].detach())
        seen["hit"].append(terms["global_path"].detach())
        return rewards, terms

    reg4rec_trainer.clipped_policy_loss, reg4rec_trainer.msra_rewards = spy_clip, spy_msra
    try:
        model.train()
        torch.manual_seed(args.seed)
        for _ in range(args.pars_batches):
            trainer.post_training_loss(next(train_batches)[: args.users])
    finally:
        reg4rec_trainer.clipped_policy_loss, reg4rec_trainer.msra_rewards = clipped, msra
    ratio = torch.cat([r.flatten() for r in seen["ratio"]])
    G = model.group_size
    reward = torch.cat(seen["reward"]).view(-1, G)
    advantage = torch.cat(seen["advantage"])
    window = model.msra_window
    target_weight = 1.0 / sum(model.msra_gamma**k for k in range(window))
    clip = trainer.clip_eps

    # -- CRSS: training order vs the beam's root codebook, first-step survival ---------------------------------
    model.eval()
    batch = next(iter(valid_data))[0][: args.users]
    item_seq, item_seq_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    target_items = batch[model.POS_ITEM_ID]
    with torch.no_grad():
        memory, padding = model.encode(item_seq, item_seq_len)
        target = model.item_vocab_tokens(target_items)
        order = model.crss_order(memory, padding, target)  # eval mode: the order training would use now
        cache = DecodingCache(model, memory, padding)
        B = item_seq.size(0)
        prefixes = torch.full((B, 1, 1), 1, dtype=torch.long)
        logits = model.beam_logits(prefixes, cache, padding).reshape(B, -1)
        used = torch.zeros(B, model.M, dtype=torch.bool)
        valid = model._valid_tokens(None, B, model.decoding_tables())
        per_codebook, root = model._crss_choice(logits, used, valid)
        root_logp = per_codebook[torch.arange(B), root]  # [B, D]
        target_local = model.item2tokens[target_items, root]
        rank = (root_logp > root_logp.gather(1, target_local.unsqueeze(1))).sum(1)
        survives = rank < model.beam_size
    agree = order[:, 0] == root

    corp_share, corp_items = corp_buried_share(model, item_seq, item_seq_len, args.corp_beam)
    tic = time.perf_counter()
    model.beam_search(item_seq, item_seq_len)  # full-sort scores at the trained beam_size, CORP as configured
    full_sort_per_1k = (time.perf_counter() - tic) / item_seq.size(0) * 1000
    result = {
        "label": args.label,
        "dataset": args.dataset,
        "seed": args.seed,
        "overrides": config_dict,
        "checkpoint": args.checkpoint,
        "sft_steps": 0 if args.checkpoint else args.sft_steps,
        "code": os.path.dirname(os.path.dirname(os.path.abspath(reg4rec_trainer.__file__))),
        "device": "CPU, 1 torch thread",
        "tokenizer": {k: tokens.stats.get(k) for k in ("collision_rate_before", "code_coherence", "feature_source")},
        "ratio_std_identical_weights": float(ratio.std()),
        "ratio_mean_abs_log": float(ratio.log().abs().mean()),
        "ratio_outside_clip": float(((ratio < 1 - clip) | (ratio > 1 + clip)).float().mean()),
        "rollout_target_hit_rate": float(torch.cat(seen["hit"]).mean()),
        "reward_std_within_group": float(reward.std(1).mean()),
        "corr_advantage_step_consistency": correlation(advantage, torch.cat(seen["consistency"])),
        "corr_advantage_step_hit": correlation(advantage, torch.cat(seen["step_hit"])),
        "msra_target_weight": target_weight,
        "crss_root_agreement": float(agree.float().mean()),
        "root_codebooks_distinct": int(root.unique().numel()),
        "first_step_survival": float(survives.float().mean()),
        "first_step_survival_agree": float(survives[agree].float().mean()) if agree.any() else float("nan"),
        "first_step_survival_disagree": float(survives[~agree].float().mean()) if (~agree).any() else float("nan"),
        "corp_buried_for_every_user": corp_share,
        "corp_items_reached_for_every_user": corp_items,
        "corp_mode": model.corp,
        "full_sort_seconds_per_1k_users": round(full_sort_per_1k, 2),
        "users": int(B),
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=1, default=str))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    np.random.seed(0)
    main()
