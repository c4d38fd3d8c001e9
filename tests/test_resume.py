"""Resume and determinism (issue 8): a run interrupted inside any training stage continues from its resume state to
exactly the numbers of an uninterrupted run with the same seed; two runs with one seed agree, RL sampling included.

Every comparison is exact: test and best-valid metrics, the training loss of every epoch, every RL statistic of
every post-training batch after the resume point (rewards, advantages, KL...), and the bytes of the final model.
An interruption is a RuntimeError raised at the second batch of an epoch (the state on disk is then the previous
epoch's). Data: the first 10 interactions of 30 users of the tiny fixture (4 training batches per epoch).
"""

import hashlib
import os
import shutil
import sys

import pytest
import torch

from conftest import DATA_PATH, TINY_CONFIG, tiny_config
from recbole_reason.checkpoint import RESUME_SUFFIX, resume_state_file
from recbole_reason.compat import load_checkpoint
from recbole_reason.quick_start import _build, _train_and_test, run_recbole_reason
from recbole.utils import init_seed

USERS, PER_USER = 30, 10
COMMON = {"dataset": "mini", "epochs": 2, "train_batch_size": 64, "eval_batch_size": 256, "stopping_step": 10}
SETTINGS = {
    "ReaRec": {"reason_step": 2, "warmup_epochs": 1},
    "SASRec": {},
    # random training depth (poisson-lognormal), RPT filter on, reference noise: every RNG LARES has
    "LARES": {"n_pre_layers": 1, "n_core_layers": 1, "mean_recurrence": 2, "rl_epochs": 2, "rl_train_batch_size": 32,
              "group_num": 2, "filter_iters": 1, "filter_topk": 200, "depth_scaling_recurrences": []},
    # the item table is re-encoded every 3 steps, so its refresh counters cross epoch boundaries
    "R2ec": {"inner_size": 32, "MAX_ITEM_LIST_LENGTH": 5, "r2ec_hist_tokens_per_item": 2, "r2ec_max_reason_len": 3,
             "r2ec_group_size": 2, "r2ec_lm_positions": 128, "recpo_epochs": 2, "r2ec_item_refresh_steps": 3},
    "REG4Rec": {"mpq_num_codebooks": 3, "mpq_codebook_size": 16, "mpq_epochs": 3, "mpq_hidden_dim": 32,
                "mpq_latent_dim": 8, "mpq_input_dim": 16, "d_model": 16, "n_enc_layers": 1, "n_dec_layers": 1,
                "ffn_dim": 32, "beam_size": 20, "beam_chunk_size": 64, "MAX_ITEM_LIST_LENGTH": 5,
                "corp_threshold": 0.75, "mpq_cf_epochs": 0, "item_feature_source": "features", "pars_group_size": 2,
                "msra_window": 2, "pars_epochs": 2},
}
STAGES = {"LARES": ("spt", "rpt"), "R2ec": ("warmup", "recpo"), "REG4Rec": ("supervised", "pars"),
          "ReaRec": ("supervised",), "SASRec": ("supervised",)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add overhead on the shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Data folder with `mini`: the first PER_USER interactions (in time) of the first USERS users of `tiny`."""
    folder = tmp_path_factory.mktemp("data")
    os.makedirs(folder / "mini")
    lines = open(os.path.join(DATA_PATH, "tiny", "tiny.inter")).read().splitlines()
    rows = {}
    for line in lines[1:]:
        rows.setdefault(line.split("\t")[0], []).append(line)
    kept = [row for user in list(rows)[:USERS] for row in sorted(rows[user], key=lambda r: float(r.split("\t")[3]))[:PER_USER]]
    items = {row.split("\t")[1] for row in kept}
    (folder / "mini" / "mini.inter").write_text("\n".join([lines[0], *kept]) + "\n")
    item_lines = open(os.path.join(DATA_PATH, "tiny", "tiny.item")).read().splitlines()
    (folder / "mini" / "mini.item").write_text(
        "\n".join([item_lines[0], *(line for line in item_lines[1:] if line.split("\t")[0] in items)]) + "\n"
    )
    return {"data_path": str(folder), "tokens": str(tmp_path_factory.mktemp("tokens"))}


def settings(model, mini, run_dir, **overrides):
    # one checkpoint folder per run: RecBole names checkpoints by the second, two quick runs would share a file
    config = {**COMMON, **SETTINGS[model], "data_path": mini["data_path"], "checkpoint_dir": str(run_dir)}
    if model == "REG4Rec":
        config["tokenizer_cache_dir"] = mini["tokens"]  # shared: the tokenizer runs once for the whole module
    return {**config, **overrides}


class Run:
    """One training run: its result, its trainer, the (stage, epoch) it trained, and every RL statistic it
    recorded as (stage, epoch, batch, name, value)."""

    def __init__(self, model, config_dict, resume=None, crash_at=None, crash_in=None):
        config = tiny_config(model, config_dict)
        init_seed(config["seed"], config["reproducibility"])
        _, data, _, trainer = _build(config)
        self.trainer, self.trained, self.stats, self.result = trainer, [], [], None
        if resume:
            trainer.resume(resume)
        self._spy(trainer, crash_at, crash_in)
        try:
            self.result = _train_and_test(config, trainer, data, saved=True, verbose=False, show_progress=False)
        except RuntimeError as error:
            if "simulated crash" not in str(error):
                raise
        self.digest = weights_digest(trainer.model)

    def _spy(self, trainer, crash_at, crash_in):
        run, train_epoch = self, trainer._train_epoch

        def spied_train_epoch(train_data, epoch_idx, loss_func=None, show_progress=False):
            run.trained.append((trainer.stage, epoch_idx))
            if (trainer.stage, epoch_idx) == crash_at:  # interrupted at the second batch of this epoch
                post = trainer.stage == getattr(trainer, "post_stage", None)
                inner = loss_func or (trainer.post_training_loss if post else trainer.model.calculate_loss)
                calls = []

                def loss_func(interaction):
                    calls.append(1)
                    if len(calls) == 2:
                        raise RuntimeError("simulated crash")
                    return inner(interaction)

            return train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

        trainer._train_epoch = spied_train_epoch
        if hasattr(trainer, "record"):
            record = trainer.record

            def spied_record(**stats):
                for name, value in stats.items():
                    run.stats.append((trainer.stage, trainer._epoch_idx, trainer._batch_idx, name, float(value)))
                return record(**stats)

            trainer.record = spied_record
        if crash_in:
            def crash(*args, **kwargs):
                raise RuntimeError("simulated crash")

            setattr(trainer, crash_in, crash)

    def numbers(self):
        """Everything that must be equal between an uninterrupted and a resumed run."""
        result = self.result
        return {
            "test": dict(result["test_result"]),
            "best_valid": dict(result["best_valid_result"]),
            "best_valid_score": result["best_valid_score"],
            "losses": dict(self.trainer.train_loss_dict),
            "stage_results": {k: (v[0], dict(v[1] or {})) for k, v in getattr(self.trainer, "stage_results", {}).items()},
            "weights": self.digest,
        }


def weights_digest(model):
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_full_runs = {}


@pytest.fixture
def full_run(mini, tmp_path_factory):
    """The uninterrupted run of a model (once per module)."""

    def get(model):
        if model not in _full_runs:
            _full_runs[model] = Run(model, settings(model, mini, tmp_path_factory.mktemp(f"{model}-full")))
        return _full_runs[model]

    return get


def interrupt_and_resume(model, mini, tmp_path, **crash):
    crashed = Run(model, settings(model, mini, tmp_path / "run"), **crash)
    assert crashed.result is None, "the simulated crash did not happen"
    checkpoint = crashed.trainer.saved_model_file
    crashed.state = load_checkpoint(resume_state_file(checkpoint))  # before the resumed run overwrites it
    resumed = Run(model, settings(model, mini, tmp_path / "elsewhere"), resume=checkpoint)
    assert resumed.trainer.saved_model_file == checkpoint  # the run goes on writing the interrupted run's files
    return crashed, resumed


def assert_same_stats_after(resumed, full):
    """The resumed run's RL statistics equal the uninterrupted run's for the same (stage, epoch, batch)."""
    assert resumed.stats, "the resumed run recorded no RL statistic"
    first = resumed.stats[0][:3]
    later = [row for row in full.stats if (row[0] == first[0] and row[1:3] >= first[1:3])]
    assert resumed.stats == later


# -- interrupted in each stage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model, crash_at, resumes_at", [
    ("ReaRec", ("supervised", 1), ("supervised", 1)),
    ("LARES", ("spt", 1), ("spt", 1)),
    ("LARES", ("rpt", 3), ("rpt", 3)),
    ("R2ec", ("warmup", 1), ("warmup", 1)),
    ("R2ec", ("recpo", 3), ("recpo", 3)),
    ("REG4Rec", ("supervised", 1), ("supervised", 1)),
    ("REG4Rec", ("pars", 2), ("pars", 2)),  # the first PARS epoch: resumes from the state written as PARS starts
])
def test_interrupted_run_resumes_to_the_uninterrupted_numbers(model, crash_at, resumes_at, mini, tmp_path, full_run):
    full = full_run(model)
    crashed, resumed = interrupt_and_resume(model, mini, tmp_path, crash_at=crash_at)
    assert crashed.trained[-1] == crash_at
    assert (crashed.state["stage"], crashed.state["epoch"] + 1) == resumes_at
    # training restarts at the interrupted epoch (the state holds the one before), in the interrupted stage
    assert resumed.trained[0] == resumes_at
    assert resumed.trained == full.trained[full.trained.index(resumes_at):]
    if len(STAGES[model]) == 2 and resumes_at[0] == STAGES[model][1]:
        assert all(stage != STAGES[model][0] for stage, _ in resumed.trained)  # stage 1 is skipped
        assert_same_stats_after(resumed, full)
    assert resumed.numbers() == full.numbers()
    if model == "REG4Rec":
        assert resumed.trainer.item_tokens.from_cache  # the tokenizer stage reuses the on-disk token cache


def test_resume_from_a_finished_first_stage_skips_it(mini, tmp_path, full_run):
    """Interrupted between the stages (in the RPT row filter): SPT is not trained again, RPT starts as it would."""
    full = full_run("LARES")
    crashed, resumed = interrupt_and_resume("LARES", mini, tmp_path, crash_in="top_k_filter")
    assert crashed.state["stage"] == "spt" and crashed.state["stage_done"]
    assert [stage for stage, _ in resumed.trained] == ["rpt", "rpt"]
    assert resumed.numbers() == full.numbers()
    assert resumed.trainer.rpt_rows_kept == full.trainer.rpt_rows_kept


def test_resuming_a_finished_run_only_tests(mini, tmp_path, full_run):
    full = full_run("R2ec")
    again = Run("R2ec", settings("R2ec", mini, tmp_path), resume=full.trainer.saved_model_file)
    assert again.trained == []
    assert again.numbers() == full.numbers()


def test_resume_with_more_epochs_extends_a_finished_run(mini, tmp_path, full_run):
    """The resume state of a finished 2-epoch run + epochs=3: only epoch 2 is trained, and the run equals a 3-epoch
    run (a resume decides 'finished' with the new settings)."""
    two = full_run("ReaRec")
    os.makedirs(tmp_path / "copy")
    for path in (two.trainer.saved_model_file, resume_state_file(two.trainer.saved_model_file)):
        shutil.copy(path, tmp_path / "copy")  # the extended run writes into the folder it resumes from
    copied = str(tmp_path / "copy" / os.path.basename(two.trainer.saved_model_file))
    extended = Run("ReaRec", settings("ReaRec", mini, tmp_path / "ext", epochs=3), resume=copied)
    assert extended.trained == [("supervised", 2)]
    assert extended.numbers() == Run("ReaRec", settings("ReaRec", mini, tmp_path / "three", epochs=3)).numbers()


def test_baseline_resumes_through_run_recbole_reason(mini, tmp_path):
    """A RecBole baseline (SASRec) through the public entry point: resume= continues it exactly."""
    full = run_recbole_reason("SASRec", config_dict=settings("SASRec", mini, tmp_path / "a"), config_file_list=[TINY_CONFIG])
    crashed = Run("SASRec", settings("SASRec", mini, tmp_path / "b"), crash_at=("supervised", 1))
    state_file = resume_state_file(crashed.trainer.saved_model_file)
    assert state_file.endswith(RESUME_SUFFIX)
    resumed = run_recbole_reason("SASRec", config_dict=settings("SASRec", mini, tmp_path / "c"),
                                 config_file_list=[TINY_CONFIG], resume=state_file)  # the -resume.pth works too
    assert dict(resumed["test_result"]) == dict(full["test_result"])
    assert dict(resumed["best_valid_result"]) == dict(full["best_valid_result"])


def test_run_script_passes_resume_and_keeps_it_out_of_config_overrides(monkeypatch):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import run_recbole_reason as script
    finally:
        sys.path.pop(0)
    seen = {}
    monkeypatch.setattr("recbole_reason.run_recbole_reason", lambda **kwargs: seen.update(kwargs))
    script.main(["--model=SASRec", "--resume=saved/SASRec-x.pth", "--epochs=3"])
    assert seen["resume"] == "saved/SASRec-x.pth"
    assert sys.argv[1:] == ["--epochs=3"]


def test_resume_state_can_be_switched_off_and_is_validated(mini, tmp_path):
    run = Run("ReaRec", settings("ReaRec", mini, tmp_path / "off", save_resume_state=False, epochs=1))
    assert os.listdir(tmp_path / "off") == [os.path.basename(run.trainer.saved_model_file)]
    with pytest.raises(ValueError, match="no resume state .* save_resume_state"):
        Run("ReaRec", settings("ReaRec", mini, tmp_path / "again"), resume=run.trainer.saved_model_file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Run("ReaRec", settings("ReaRec", mini, tmp_path / "again"), resume=str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="save_resume_state = .yes. .*must be true or false"):  # config_checks
        Run("ReaRec", settings("ReaRec", mini, tmp_path / "bad", save_resume_state="yes"))


# -- determinism -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["LARES", "R2ec", "REG4Rec"])
def test_same_seed_same_numbers_rl_sampling_included(model, mini, tmp_path, full_run):
    first, second = full_run(model), Run(model, settings(model, mini, tmp_path))
    assert first.stats and second.stats == first.stats  # every reward / advantage / KL of every RL batch
    assert {name for _, _, _, name, _ in first.stats} >= {"reward", "advantage_abs_mean"}
    assert len({value for *_, name, value in first.stats if name == "reward"}) > 1  # sampling really varies
    assert second.numbers() == first.numbers()
