"""`run_recbole_reason` and `objective_function`: RecBole's quick start, resolved through the plugin.

Same steps as `recbole.quick_start.run_recbole` (Config, seed, logger, dataset, split, model, trainer, fit,
evaluate), minus the FLOPs count, and without importing `recbole.quick_start` (ray).
"""

import sys
from logging import getLogger

from recbole.data import data_preparation
from recbole.utils import get_environment, init_seed, set_color

from recbole_reason.config import Config
from recbole_reason.distributed import init_rank_logger, rank_zero_first, run_distributed
from recbole_reason.utils import create_dataset, get_model, get_trainer, metrics_table  # noqa: F401 (re-exported)


def _build(config):
    """Dataset, loaders, model and trainer for a ready Config."""
    # Under DDP rank 0 goes first: it writes the caches (saved dataset, LARES's positives index) the others read.
    with rank_zero_first(config):
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return dataset, (train_data, valid_data, test_data), model, trainer


def _train_and_test(config, trainer, data, saved, verbose, show_progress):
    """fit, then test; the result dict HyperTuning and the run script share."""
    train_data, valid_data, test_data = data
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=show_progress)
    # Optional trainer hook for evaluations beyond RecBole's (e.g. LARES's metrics per test depth).
    extra_results = trainer.post_evaluate(test_data) if hasattr(trainer, "post_evaluate") else {}
    if getattr(trainer, "replica_digests", None):  # DDP: a state_dict hash per rank, all equal
        extra_results["replica_digests"] = trainer.replica_digests
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
        **extra_results,
    }


def run_recbole_reason(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, nproc=1,
                       resume=None):
    """Train and test one model (plugin or RecBole) on one dataset. Returns RecBole's result dict plus `model`.
    `nproc` > 1: that many DDP processes (`distributed.run_distributed`: NCCL on GPUs, Gloo on the CPU).
    `resume`: the checkpoint of an interrupted run with the same settings (<checkpoint_dir>/<Model>-<time>.pth, or
    the -resume.pth next to it); training continues after its last finished epoch, in its stage, and ends with the
    numbers the uninterrupted run would have given (`checkpoint.CheckpointMixin.resume`)."""
    if resume:
        config_dict = {**(config_dict or {}), "resume": str(resume)}  # a config key, so DDP workers get it too
    if nproc != 1:
        return run_distributed(run_recbole_reason, model, dataset, config_file_list, config_dict, nproc=nproc, saved=saved)
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_rank_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset, data, model, trainer = _build(config)
    if config["resume"]:
        trainer.resume(config["resume"])
    logger.info(dataset)
    logger.info(model)
    result = _train_and_test(config, trainer, data, saved, verbose=True, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {dict(result['best_valid_result'] or {})}")
    logger.info(set_color("test result", "yellow") + f": {dict(result['test_result'] or {})}")
    logger.info(
        set_color(f"{config['model']} on {config['dataset']}", "yellow")
        + "\n"
        + metrics_table({"best valid": result["best_valid_result"], "test": result["test_result"]})
    )
    if config["explain_users"]:
        result["explanations"] = explain(trainer.model, data[2]._dataset, config["explain_users"])
    return result


def explain(model, dataset, users):
    """Log what a model with an `explain` method (R2ec) reasons for some users (external user ids)."""
    if not hasattr(model, "explain"):
        raise ValueError(f"--explain_users: {type(model).__name__} generates no readable reasoning (R2ec does).")
    users = [str(user) for user in (users if isinstance(users, (list, tuple)) else [users])]
    explanations = model.explain(dataset, users)
    for item in explanations:
        getLogger().info(
            set_color(f"user {item['user']}", "yellow")
            + f"\n  history (last 5): {item['history'][-5:]}\n  reasoning: {' '.join(item['reasoning'])}"
            + f"\n  top items: {item['top_items']}\n  target: {item['target']}"
        )
    return explanations


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """The objective for RecBole's `HyperTuning`: quiet training, returns the dict HyperTuning expects."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    init_rank_logger(config)
    _, data, _, trainer = _build(config)
    return _train_and_test(config, trainer, data, saved, verbose=False, show_progress=False)
