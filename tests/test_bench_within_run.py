"""bench/run_bench.py's within-run section: post-training vs its first stage, an ablation vs its model, per user."""

import importlib.util
import os

import numpy as np

from recbole_reason.per_user import save_per_user
from recbole_reason.tables import format_p

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run_bench.py")


def load_run_bench():
    spec = importlib.util.spec_from_file_location("run_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_within_run_section_pairs_each_row_with_the_run_it_came_from(tmp_path):
    run_bench = load_run_bench()
    rng = np.random.default_rng(0)
    users = np.arange(1, 201)
    rows = []
    for seed in (2020, 2021):
        sft = rng.uniform(0, 0.1, size=users.size)
        values = {"REG4Rec": sft + 0.05, "REG4Rec-SFT": sft, "REG4Rec-noCORP": sft + 0.05}  # PARS helps, CORP does nothing
        for variant, ndcg in values.items():
            path = f"per_user/{variant}_{seed}.npz"
            os.makedirs(tmp_path / "per_user", exist_ok=True)
            save_per_user(str(tmp_path / path), {"user_id": users, "ndcg@10": ndcg})
            record = {"variant": variant, "seed": seed, "per_user_file": path}
            # seed 2020: post-training raised valid; seed 2021: it did not. run_one copies the log into the
            # inference-time row (noCORP), which must not get a line of its own.
            if variant != "REG4Rec-SFT":
                record["valid_log"] = [("supervised", 0.040), ("pars", 0.045 if seed == 2020 else 0.035)]
            if variant != "REG4Rec":
                record["from_run_of"] = "REG4Rec"
            rows.append(record)
    lines = run_bench.within_run_sections(rows, str(tmp_path))
    text = "\n".join(lines)
    pars = next(line for line in lines if line.startswith("| REG4Rec | REG4Rec-SFT |"))
    corp = next(line for line in lines if line.startswith("| REG4Rec | REG4Rec-noCORP |"))
    assert "| 200 |" in pars and "+0.0500" in pars and "<0.001" in pars
    one = format_p(1.0)
    assert "+0.0000" in corp and corp.endswith(f"| {one} | {one} |")  # identical values: no evidence either way
    assert "| REG4Rec | 2020 | 0.0400 | 0.0450 | yes |" in text
    assert "| REG4Rec | 2021 | 0.0400 | 0.0350 | no |" in text
    assert "| REG4Rec-noCORP | 2020 |" not in text


def test_within_run_section_is_empty_for_single_stage_runs(tmp_path):
    run_bench = load_run_bench()
    assert run_bench.within_run_sections([{"variant": "SASRec", "seed": 2020}], str(tmp_path)) == []


def test_log_valid_scores_keeps_every_validation_with_its_stage():
    from recbole_reason.compare import log_valid_scores

    class StagedTrainer:  # the two things log_valid_scores reads: _valid_epoch and the stage's name
        stage = "warmup"
        scores = iter([0.02, 0.03, 0.025])

        def _valid_epoch(self, valid_data, show_progress=False):
            score = next(self.scores)
            return score, {"ndcg@10": score, "recall@10": 2 * score}

    trainer = StagedTrainer()
    by_score, by_recall = log_valid_scores(trainer), log_valid_scores(trainer, "recall@10")
    trainer._valid_epoch(None)
    trainer._valid_epoch(None)
    trainer.stage = "recpo"
    score, result = trainer._valid_epoch(None)
    assert (score, result["ndcg@10"]) == (0.025, 0.025)  # the wrapped method still returns what RecBole expects
    assert by_score == [("warmup", 0.02), ("warmup", 0.03), ("recpo", 0.025)]  # not the best so far: every one
    assert by_recall == [("warmup", 0.04), ("warmup", 0.06), ("recpo", 0.05)]


def test_saved_checkpoints_are_oldest_first_and_none_names_the_fix(tmp_path):
    import pytest

    from recbole_reason.compare import saved_checkpoints

    with pytest.raises(FileNotFoundError, match=r"no R2ec-\*\.pth in .*: train its first stage first"):
        saved_checkpoints(str(tmp_path), "R2ec", "train its first stage first")
    for name, mtime in (("R2ec-b.pth", 200), ("R2ec-a.pth", 300), ("SASRec-c.pth", 100)):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (mtime, mtime))
    assert [os.path.basename(p) for p in saved_checkpoints(str(tmp_path), "R2ec", "")] == ["R2ec-b.pth", "R2ec-a.pth"]
