"""Post-training epochs (REG4Rec PARS, R2ec RecPO, LARES RPT) from a trained first-stage checkpoint, per setting:
valid NDCG@10 before and after. A probe for choosing post-training settings on valid (issues 15 and 18).

    python bench/post_training_probe.py --model REG4Rec --checkpoint_dir /tmp/benchck/reg4rec_v3_2020 --seed 2020 \
        --label no-category --tag reg4rec_pars_probe_ml-100k_cpu --set MAX_ITEM_LIST_LENGTH=10 train_batch_size=512 \
        pars_context_ratio=0.25 "pars_reward_weights=[1.0,1.0,0.0,0.0]"

The checkpoint is the oldest `<model>-*.pth` of the folder, which must hold the first-stage model (bench/run_bench.py
and bench/r2ec_learns.py write it at the end of the first stage and overwrite it only when post-training raises
valid), with REG4Rec's token cache beside it. The post-training stage is entered as `PostTrainingTrainer.fit` enters
it (frozen reference, the stage's set-up, a fresh optimizer at its learning rate and clipping), `--epochs` epochs
(default 1) run, and valid NDCG@10 is measured after each. With `--test`, test NDCG@10 of the first-stage model and of
the model fit would keep (the best on valid among the first stage and the post-training epochs) are recorded too.
Each record names the setting, the seed, both valid scores and the last epoch's post-training statistics (rewards,
KL), and with `--eval_every N` valid NDCG@10 after every N batches (the trajectory). `--loss first_stage` is the
control: the same stage set-up and batches, but the first stage's own loss, so that a fall in valid can be put on the
post-training objective or on the set-up (fresh optimizer, rate, clipping, dropout). Appends one JSON line to
bench/results/<tag>.jsonl.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class BatchBudgetSpent(Exception):
    """Raised before batch --max_batches + 1: the epoch ends there."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a plugin model with a post-training stage: REG4Rec, R2ec, LARES")
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--label", required=True, help="the setting's name in the results")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--data_path", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
    parser.add_argument("--set", nargs="*", default=[], help="key=value config overrides (the run's and the probe's)")
    parser.add_argument("--epochs", type=int, default=1, help="post-training epochs, valid NDCG@10 after each")
    parser.add_argument("--test", action="store_true",
                        help="also test NDCG@10 of the first stage and of the model best on valid (as fit selects)")
    parser.add_argument("--max_batches", type=int, default=0,
                        help="stop the (single) epoch after this many batches, a cheap first look (0: the whole epoch)")
    parser.add_argument("--loss", choices=("post", "first_stage"), default="post",
                        help="post: the post-training loss; first_stage: the control, the first stage's own loss "
                             "(calculate_loss) under the post stage's set-up (fresh optimizer at its rate, clipping, "
                             "dropout): does the objective or the stage's set-up move valid?")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="also measure valid NDCG@10 every this many batches inside the epoch (0: only at its end)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.max_batches < 0 or (args.max_batches and args.epochs > 1):
        parser.error("--max_batches must be >= 0 and needs --epochs 1 (it cuts the one epoch short)")
    command = "python bench/post_training_probe.py " + " ".join(sys.argv[1:])
    overrides = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)}
    sys.argv = sys.argv[:1]
    from recbole.utils import ModelType, init_seed

    from recbole_reason import get_trainer
    from recbole_reason.compare import device_name, git_commit, saved_checkpoints
    from recbole_reason.config import Config
    from recbole_reason.quick_start import _build

    torch.set_num_threads(1)
    probe_trainer = get_trainer(ModelType.SEQUENTIAL, args.model)
    if not hasattr(probe_trainer, "post_epochs_key"):
        parser.error(f"{args.model} has no post-training stage (its trainer is {probe_trainer.__name__})")
    config = Config(model=args.model, dataset="ml-100k", config_file_list=[os.path.join(REPO, "bench/configs/cpu.yaml")],
                    config_dict={probe_trainer.post_epochs_key: 1, **overrides, "seed": args.seed, "checkpoint_dir": args.checkpoint_dir,
                                 "data_path": args.data_path, "save_resume_state": False, "state": "ERROR"})
    init_seed(args.seed, config["reproducibility"])
    _, (train_data, valid_data, test_data), model, trainer = _build(config)
    checkpoints = saved_checkpoints(args.checkpoint_dir, args.model, "train its first stage first")
    trainer.load_model_weights(checkpoints[0])
    valid_before = float(trainer.evaluate(valid_data, load_best_model=False)["ndcg@10"])
    test_first_stage = float(trainer.evaluate(test_data, load_best_model=False)["ndcg@10"]) if args.test else None
    trainer._enter_post_stage(train_data, start_epoch=1)
    start = time.perf_counter()
    trajectory, steps = [], 0

    def probed_loss(interaction):
        # called before the batch's step, so the score is the model after `steps` steps; evaluation draws no random
        # numbers, so the epoch's updates are those of a run without probes
        nonlocal steps
        if args.max_batches and steps == args.max_batches:
            raise BatchBudgetSpent
        if args.eval_every and steps and steps % args.eval_every == 0:
            trajectory.append((steps, float(trainer.evaluate(valid_data, load_best_model=False)["ndcg@10"])))
            trainer.model.train()
            print("after", steps, "batches: valid ndcg@10", trajectory[-1][1], flush=True)
        steps += 1
        if args.loss == "first_stage":
            return trainer.model.calculate_loss(interaction)
        return trainer.post_training_loss(interaction)

    best_valid, best_state, valid_by_epoch = valid_before, None, []
    probing = args.eval_every or args.max_batches or args.loss == "first_stage"
    for epoch in range(1, args.epochs + 1):
        trainer.model.train()
        try:
            trainer._train_epoch(train_data, epoch, loss_func=probed_loss if probing else None)
        except BatchBudgetSpent:
            pass
        valid_by_epoch.append(float(trainer.evaluate(valid_data, load_best_model=False)["ndcg@10"]))
        if valid_by_epoch[-1] > best_valid:  # fit keeps the first stage's model unless post-training beats it
            best_valid, best_state = valid_by_epoch[-1], copy.deepcopy(trainer.model.state_dict())
    seconds = time.perf_counter() - start  # with the probes' evaluations, if any
    record = {"model": args.model, "label": args.label, "seed": args.seed, "overrides": overrides, "loss": args.loss,
              "checkpoint": checkpoints[0],
              "valid_ndcg@10_first_stage": valid_before, "valid_ndcg@10_after_post_epoch": valid_by_epoch[0],
              "valid_ndcg@10_by_batches": trajectory,
              "post_epoch_seconds": seconds / args.epochs, "post_stats": {k: sum(v) / len(v) for k, v in trainer._stats.items()},
              "command": command, "commit": git_commit(), "device": device_name()}
    if args.epochs > 1:
        record["valid_ndcg@10_by_epoch"] = valid_by_epoch
    if args.max_batches:
        record["batches"] = steps  # the epoch was cut short here
    if args.test:
        if best_state is not None:
            trainer.model.load_state_dict(best_state)
        record.update({"test_ndcg@10_first_stage": test_first_stage,
                       "selected": "first_stage" if best_state is None else "post",
                       "test_ndcg@10_selected": float(trainer.evaluate(test_data, load_best_model=False)["ndcg@10"])})
    print(json.dumps(record), flush=True)
    with open(os.path.join(REPO, "bench", "results", f"{args.tag}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
