"""Using a trained model: load_data_and_model (RecBole's signature) round trip, RecBole's full_sort_topk on it,
checkpoints from another machine, the recommend command and API, and plain numbers in the run log."""

import csv
import glob
import json
import os
import shutil
import sys

import pytest
import torch
from recbole.utils.case_study import full_sort_topk

import run_recbole_reason
from conftest import DATA_PATH, TINY_CONFIG
from recbole_reason import get_trainer, load_data_and_model, recommend, run_recbole_reason as train
from recbole_reason.compat import load_checkpoint
from recbole_reason.inference import next_item_rows

# Short sequences and a user filter keep every run at a few seconds on the 2-core CPU.
FAST = {"MAX_ITEM_LIST_LENGTH": 5, "train_batch_size": 512, "user_inter_num_interval": "[20,40]"}
R2EC = {"r2ec_hist_tokens_per_item": 2, "r2ec_max_reason_len": 3, "r2ec_group_size": 2, "r2ec_lm_positions": 256,
        "recpo_epochs": 0, "train_batch_size": 128}


def raw_histories():
    """user -> [(timestamp, item)] straight from the atomic file: an independent reference."""
    histories = {}
    with open(os.path.join(DATA_PATH, "tiny", "tiny.inter")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            histories.setdefault(row["user_id:token"], []).append((float(row["timestamp:float"]), row["item_id:token"]))
    return histories


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plugin model (ReaRec), a RecBole baseline (SASRec) and R2ec (writes a reasoning), 1 epoch each on tiny data."""
    folder = tmp_path_factory.mktemp("runs")
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["pytest"]
    os.chdir(folder)
    try:
        out = {}
        for name, model, extra in (("ReaRec", "ReaRec", {"reason_step": 2}), ("SASRec", "SASRec", {"state": "INFO"}),
                                   ("R2ec", "R2ec", R2EC)):
            config_dict = {"data_path": DATA_PATH, "checkpoint_dir": str(folder / "saved"), **FAST, **extra}
            out[name] = train(model, "tiny", [TINY_CONFIG], config_dict)
        out["folder"] = folder
        return out
    finally:
        sys.argv = argv
        os.chdir(cwd)


@pytest.mark.parametrize("name", ["ReaRec", "SASRec"])
def test_load_data_and_model_round_trip_reproduces_the_runs_test_metrics(runs, name):
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(runs[name]["saved_model_file"])
    assert type(model).__name__ == name and config["model"] == name
    assert len(train_data) > 0 and len(valid_data) > 0
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert result == runs[name]["test_result"]  # the same numbers, exactly
    assert all(type(value) is float for value in result.values())

    # RecBole's case-study helper works on what it returns
    uids = dataset.token2id(dataset.uid_field, ["105", "107"])
    scores, items = full_sort_topk(uids, model, test_data, k=5, device=config["device"])
    assert items.shape == (2, 5) and (items > 0).all() and torch.isfinite(scores).all()


def test_a_checkpoint_from_another_machine_loads_with_this_machines_data_path(runs, tmp_path):
    """Stored data path and device of another machine (a CUDA GPU): --data_path replaces the path, the CPU the GPU."""
    checkpoint = load_checkpoint(runs["ReaRec"]["saved_model_file"])
    checkpoint["config"]["data_path"] = "/gpu-machine/site-packages/data/tiny"
    checkpoint["config"]["device"] = torch.device("cuda") if not torch.cuda.is_available() else torch.device("cpu")
    moved = tmp_path / "from-gpu.pth"
    torch.save(checkpoint, moved)
    with pytest.raises(FileNotFoundError, match="Dataset 'tiny' not found"):
        load_data_and_model(str(moved))
    config, model, _, _, _, test_data = load_data_and_model(str(moved), {"data_path": DATA_PATH})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert trainer.evaluate(test_data, load_best_model=False) == runs["ReaRec"]["test_result"]


def test_the_recommend_input_is_the_whole_known_sequence(runs):
    _, model, dataset, _, _, test_data = load_data_and_model(runs["ReaRec"]["saved_model_file"])
    user = "105"
    uid = int(dataset.token2id(dataset.uid_field, user))
    batch = next_item_rows(test_data.dataset, {user: uid}, model.ITEM_SEQ, model.ITEM_SEQ_LEN, "_list")
    length = int(batch[model.ITEM_SEQ_LEN][0])
    items = dataset.id2token(dataset.iid_field, batch[model.ITEM_SEQ][0, :length].tolist()).tolist()
    history = [item for _, item in sorted(raw_histories()[user], key=lambda pair: pair[0])]
    assert length == 5 and items[-1] == history[-1]  # the held-out last item is part of the input
    assert set(items) <= set(history[-6:])  # the most recent items (ties in time may reorder them)
    times = batch["timestamp_list"][0, :length]
    assert (times[1:] >= times[:-1]).all() and float(times[-1]) == pytest.approx(max(t for t, _ in raw_histories()[user]), rel=1e-7)  # float32


def test_recommend_command_prints_k_new_items_per_user_with_titles(runs, tmp_path, capsys):
    users = ["105", "107"]
    out = tmp_path / "recs.json"
    recs = run_recbole_reason.main(["--recommend", runs["SASRec"]["saved_model_file"], "--users", ",".join(users),
                                    "--k", "4", "--output", str(out)])
    printed = capsys.readouterr().out
    histories = raw_histories()
    assert [entry["user"] for entry in recs] == users
    for entry in recs:
        assert len(entry["items"]) == 4 and len(set(entry["items"])) == 4
        assert not set(entry["items"]) & {item for _, item in histories[entry["user"]]}  # none from the history
        assert entry["history_size"] == len({item for _, item in histories[entry["user"]]})
        assert all(entry["titles"]) and entry["scores"] == sorted(entry["scores"], reverse=True)
        assert f"user {entry['user']} " in printed and all(title in printed for title in entry["titles"])
    assert json.loads(out.read_text()) == recs
    assert printed.count("\n    1. ") == 2 and printed.count("\n    4. ") == 2 and "\n    5. " not in printed

    csv_file = tmp_path / "recs.csv"
    run_recbole_reason.main(["--recommend", runs["SASRec"]["saved_model_file"], "--users", "105", "--k", "3",
                             "--output", str(csv_file)])
    rows = list(csv.DictReader(open(csv_file)))
    assert [row["rank"] for row in rows] == ["1", "2", "3"] and rows[0]["item_id"] == recs[0]["items"][0]


def test_keep_history_ranks_the_same_scores_without_the_filter(runs):
    _, model, dataset, _, _, test_data = load_data_and_model(runs["ReaRec"]["saved_model_file"])
    every = dataset.item_num - 1
    kept = recommend(model, dataset, test_data, ["105"], k=every, keep_history=True)[0]
    new = recommend(model, dataset, test_data, ["105"], k=10)[0]
    history = {item for _, item in raw_histories()["105"]}
    assert set(kept["items"]) & history  # the history is back among the candidates
    assert [item for item in kept["items"] if item not in history][:10] == new["items"]
    twice = recommend(model, dataset, test_data, ["105", "105"], k=10)  # a repeated user is answered once
    assert [entry["user"] for entry in twice] == ["105"] and twice[0]["items"] == new["items"]


def test_r2ec_recommendations_carry_its_reasoning(runs, capsys):
    recs = run_recbole_reason.main(["--recommend", runs["R2ec"]["saved_model_file"], "--users", "105", "--k", "3"])
    assert recs[0]["reasoning"] and recs[0]["reasoning"][-1] == "[ANS]"
    assert "reasoning: " in capsys.readouterr().out
    assert not set(recs[0]["items"]) & {item for _, item in raw_histories()["105"]}
    # a model without `explain` has none
    assert run_recbole_reason.main(["--recommend", runs["ReaRec"]["saved_model_file"], "--users", "105"])[0]["reasoning"] is None


@pytest.mark.parametrize("argv, message", [
    (["--users", "999999"], "error: Unknown user '999999': not a user_id of dataset 'tiny'"),
    (["--users", "105", "--k", "0"], "error: k must be an integer >= 1"),
    (["--users", "105", "--output", "x.txt"], "error: --output x.txt: the file name must end in .csv or .json"),
    ([], "error: --recommend needs --users"),
])
def test_recommend_command_rejects_bad_input_with_one_line(runs, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["run_recbole_reason.py", "--recommend", runs["SASRec"]["saved_model_file"], *argv])
    with pytest.raises(SystemExit) as stop:
        run_recbole_reason.cli()
    first, *rest = str(stop.value.code).splitlines()
    assert first.startswith(message) and rest == ["(set RECBOLE_REASON_TRACEBACK=1 to see the full traceback)"]


def test_a_missing_checkpoint_is_one_line_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["run_recbole_reason.py", "--recommend", "saved/nope.pth", "--users", "1"])
    with pytest.raises(SystemExit) as stop:
        run_recbole_reason.cli()
    assert str(stop.value.code).splitlines()[0].startswith("error: Checkpoint saved/nope.pth does not exist")
    assert not os.path.exists(tmp_path / "log")  # nothing was set up


def test_run_logs_hold_plain_numbers(runs):
    logs = glob.glob(str(runs["folder"] / "log" / "SASRec" / "*.log"))  # the run logged at INFO
    text = "".join(open(log).read() for log in logs)
    assert "test result" in text and "best valid" in text and "'ndcg@10': 0." in text
    assert "np.float64(" not in text and "np.float32(" not in text


def test_checkpoint_of_another_model_file_is_refused(tmp_path):
    bad = tmp_path / "not-a-checkpoint.pth"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="is not a RecBole checkpoint"):
        load_data_and_model(str(bad))
    shutil.rmtree(tmp_path / "log", ignore_errors=True)


def _imported_modules(path):
    """Every module a source file imports, at its top or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lower_layers_never_import_the_quick_start_and_the_scripts_import_no_script():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.join(root, "recbole_reason")
    workflows = {"quick_start.py", "hyper.py", "compare.py", "depth_study.py", "__init__.py"}  # above the quick start
    lower = [path for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
             if os.path.relpath(path, package) not in workflows]
    lower_names = {os.path.basename(p) for p in lower}
    assert {"config.py", "distributed.py", "utils.py", "inference.py", "figures.py", "tables.py"} <= lower_names
    for path in lower:
        assert "recbole_reason.quick_start" not in _imported_modules(path), path
    # the tables are built from stored records only: they never reach the comparison's running code
    assert "recbole_reason.compare" not in _imported_modules(os.path.join(package, "tables.py"))
    scripts = ("run_recbole_reason", "run_hyper", "run_compare", "run_depth_study")
    for script in scripts:
        assert not _imported_modules(os.path.join(root, f"{script}.py")) & set(scripts), script
