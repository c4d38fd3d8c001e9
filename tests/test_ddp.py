"""DDP (`nproc=N`, `--nproc N`): backend choice and launcher checks in-process, then real 2-process Gloo runs on the
CPU: the building blocks (rank-0-first caches, broadcasts, R2ec's row merge, replica digests), SASRec through our
path, and R2ec's two stages (warm-up -> RecPO), each asserting bit-identical replicas after training."""

import glob
import importlib.util
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.data import data_preparation
from recbole.utils import ModelType

import recbole_reason
from recbole_reason import Config, create_dataset, get_trainer, run_recbole_reason
from recbole_reason.compat import load_checkpoint
from recbole_reason.distributed import (
    DistributedTrainerMixin,
    _threads_per_process,
    broadcast_from_rank0,
    choose_backend,
    free_port,
    init_distributed_device,
    merge_row_updates,
    rank_zero_first,
    replica_digests,
)

from conftest import DATA_PATH, TINY_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- in-process: backend, validation, the one-process path -------------------------------------------------------------
def test_backend_follows_the_device():
    assert choose_backend("", cuda_available=False) == "gloo"
    assert choose_backend("0,1", cuda_available=False) == "gloo"  # GPUs named but no CUDA: the CPU trains
    assert choose_backend("", cuda_available=True) == "gloo"  # CUDA present but gpu_id '' asks for the CPU
    assert choose_backend("0,1", cuda_available=True) == "nccl"
    assert choose_backend((0, 1), cuda_available=True) == "nccl"  # RecBole's tuple form of gpu_id


def _settings(**overrides):
    settings = {"gpu_id": "", "nproc": 2, "local_rank": 0, "world_size": 2, "offset": 0, "ip": "localhost"}
    settings["port"] = 29999
    settings.update(overrides)
    return settings


def test_bad_distributed_settings_fail_before_any_process_group(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # init_distributed_device sets it, as RecBole does
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"nproc=2 processes need 2 GPUs, but gpu_id='0' gives 1 usable"):
        init_distributed_device(_settings(gpu_id="0"))
    with pytest.raises(ValueError, match="world_size must be an integer >= 2"):
        init_distributed_device(_settings(world_size=1))
    with pytest.raises(ValueError, match="offset \\+ nproc must be <= world_size"):
        init_distributed_device(_settings(offset=1))
    with pytest.raises(ValueError, match="local_rank must be < nproc=2"):
        init_distributed_device(_settings(local_rank=2))
    with pytest.raises(ValueError, match="port must be an integer >= 1"):
        init_distributed_device(_settings(port="auto"))
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="nproc must be an integer >= 1"):
        run_recbole_reason("SASRec", "tiny", [TINY_CONFIG], {"data_path": DATA_PATH}, nproc=0)


def test_one_process_is_todays_path(tiny):
    config = Config(model="SASRec", config_file_list=[TINY_CONFIG], config_dict=tiny())
    assert config["single_spec"] is True and config["local_rank"] == 0 and config["device"].type == "cpu"
    assert config["backend"] is None and not dist.is_initialized()
    for name in ("SASRec", "R2ec", "LARES"):
        assert issubclass(get_trainer(ModelType.SEQUENTIAL, name), DistributedTrainerMixin)
    # the mixin comes first in the MRO: it must not hide a trainer's own declaration
    assert get_trainer(ModelType.SEQUENTIAL, "R2ec").ddp_row_synced_buffers == ("item_table",)


def test_run_script_passes_nproc(monkeypatch):
    spec = importlib.util.spec_from_file_location("run_script", os.path.join(REPO, "run_recbole_reason.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(recbole_reason, "run_recbole_reason", lambda **kwargs: calls.append(kwargs))
    script.main(["-m", "SASRec", "-d", "tiny", "--nproc", "2", "--epochs=3"])
    assert sys.argv[1:] == ["--epochs=3"]
    script.main(["-m", "SASRec", "-d", "tiny", "--nproc=3"])
    assert sys.argv[1:] == []  # --nproc=3 is the script's option, not a config override for Config to read
    script.main(["-m", "SASRec", "-d", "tiny"])
    assert [call["nproc"] for call in calls] == [2, 3, 1]


def test_threads_per_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert _threads_per_process(2) == max(1, cores // 2) and _threads_per_process(10 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads_per_process(2) is None  # the user's setting wins


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as probe:
        probe.bind(("localhost", port))


# -- two processes: the building blocks --------------------------------------------------------------------------
def _blocks(rank, port, folder, queue):
    settings = _settings(local_rank=rank, port=port)
    init_distributed_device(settings)
    try:
        order = os.path.join(folder, "order.txt")
        with rank_zero_first(settings):
            if rank == 0:
                time.sleep(0.5)  # rank 1 would write first if it did not wait
            with open(order, "a") as f:
                f.write(str(rank))
        dist.barrier()
        table = torch.zeros(6, 2)
        before = table.clone()
        table[1 + rank] = rank + 1.0  # each rank overwrites its own batch's row...
        table[4] = 7.0  # ...and both the same row, with the same value
        merged = merge_row_updates(table, before, settings)
        torch.manual_seed(rank)
        out = {
            "order": open(order).read(),
            "tensor": broadcast_from_rank0(torch.tensor([rank, 10 + rank]), settings).tolist(),
            "name": broadcast_from_rank0(f"checkpoint-of-rank-{rank}.pth", settings),
            "table": table.tolist(),
            "merged": merged,
            "differing": replica_digests(torch.nn.Linear(2, 2), settings),
            "backend": settings["backend"],
            "quiet": (settings["state"], settings["show_progress"]) if rank else None,
        }
        torch.manual_seed(0)
        out["equal"] = replica_digests(torch.nn.Linear(2, 2), settings)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_building_blocks_across_two_processes(tmp_path):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_blocks, args=(free_port(), str(tmp_path), queue), nprocs=2)
    results = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        out = results[rank]
        assert out["backend"] == "gloo"
        assert out["order"] == "01"  # rank_zero_first: rank 0's block (cache writes) ran before rank 1's
        assert out["tensor"] == [0, 10] and out["name"] == "checkpoint-of-rank-0.pth"
        # every rank keeps the union of the rows all ranks changed
        assert out["table"] == [[0, 0], [1, 1], [2, 2], [0, 0], [7, 7], [0, 0]] and out["merged"] == 4
        assert len(set(out["differing"])) == 2 and len(set(out["equal"])) == 1  # the digest tells replicas apart
    assert results[1]["quiet"] == ("error", False)  # rank 1 logs errors only


# -- two processes, end to end ----------------------------------------------------------------------------------------
def test_sasrec_through_our_path_with_two_processes(tiny, tmp_path):
    saved = tmp_path / "saved"
    result = run_recbole_reason(
        "SASRec", "tiny", [TINY_CONFIG], tiny(MAX_ITEM_LIST_LENGTH=5, checkpoint_dir=str(saved)), nproc=2
    )
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0 and result["best_valid_result"]
    digests = result["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical replicas after training
    # only rank 0 writes: one log file, one TensorBoard run, one best-model checkpoint
    assert len(glob.glob(os.path.join(tmp_path, "log", "SASRec", "*.log"))) == 1
    assert len(os.listdir(tmp_path / "log_tensorboard")) == 1
    best = [name for name in os.listdir(saved) if not name.endswith("-resume.pth")]
    assert best == [os.path.basename(result["saved_model_file"])]
    # the checkpoint's config reloads in one process (no process group here)
    config = load_checkpoint(result["saved_model_file"])["config"]
    assert config["single_spec"] is True and not dist.is_initialized()
    train_data, _, _ = data_preparation(config, create_dataset(config))
    assert len(train_data) > 0


def test_r2ec_warmup_and_recpo_with_two_processes(tiny, tmp_path):
    # 31 users with 20-25 interactions and 64 rows per rank and step keep both stages within seconds (as test_r2ec)
    config_dict = tiny(
        state="INFO", hidden_size=16, inner_size=32, n_layers=1, n_heads=2, MAX_ITEM_LIST_LENGTH=5,
        r2ec_hist_tokens_per_item=2, r2ec_max_reason_len=3, r2ec_group_size=2, r2ec_lm_positions=256,
        train_batch_size=128, epochs=1, recpo_epochs=1, r2ec_item_refresh_steps=2, user_inter_num_interval="[20,25]",
    )
    result = run_recbole_reason("R2ec", "tiny", [TINY_CONFIG], config_dict, nproc=2)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    # the ranks trained on different halves of every batch, RecPO included: equal state_dicts = averaged gradients
    digests = result["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    (log_file,) = glob.glob(os.path.join(tmp_path, "log", "R2ec", "*.log"))
    log = open(log_file).read()
    assert "stage 2/2: recpo" in log and "training (recpo)" in log and "rank 1" not in log


def test_an_error_in_a_process_is_raised_by_the_launcher(tiny):
    with pytest.raises(ValueError, match="Unknown model 'NoSuchModel'") as raised:
        run_recbole_reason("NoSuchModel", "tiny", [TINY_CONFIG], tiny(), nproc=2)
    assert any("raised in DDP process" in note for note in raised.value.__notes__)
