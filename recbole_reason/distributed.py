"""Multi-process training (PyTorch DDP) for plugin models and RecBole's own, on GPUs and on the CPU.

The launcher, `run_distributed` (`run_recbole_reason(..., nproc=N)`, `--nproc N`), spawns N processes as RecBole's
`run_recboles` does; each runs the ordinary single-process path with `local_rank` in its config. Everything that
differs under DDP lives here:

- backend (`choose_backend`): NCCL when CUDA is available and `gpu_id` names GPUs, Gloo otherwise. RecBole 1.2.1's
  `Config._init_device` hard-codes NCCL, `torch.cuda.set_device` and `len(gpu_id) >= nproc`, so it cannot run on
  the CPU; our `Config` calls `init_distributed_device` instead whenever `local_rank` is set.
- the trainer (`DistributedTrainerMixin`, added by `utils.get_trainer` to every trainer): RecBole's
  `AbstractTrainer` wraps the model with `device_ids=[local_rank]`, which DDP rejects for a CPU module; the mixin
  wraps it with `device_ids=None` on the CPU. Gradients are averaged by RecBole's own step (`set_reduce_hook` +
  `sync_grad_loss` in `Trainer._train_epoch`), which every stage of our trainers runs through, post-training
  stages included. Only rank 0 writes checkpoints, logs and TensorBoard; the other ranks wait at a barrier before
  they read a checkpoint rank 0 wrote.
- caches written during a run (datasets, LARES's positives index, REG4Rec's token table): `rank_zero_first`,
  rank 0 builds and writes, the others wait at a barrier, then read.
- per-stage state that must be identical on every rank: `broadcast_from_rank0` (LARES's RPT row filter decides
  the number of batches, which must match across ranks), `merge_row_updates` (R2ec's item table, whose in-batch
  rows every rank overwrites with its own batch's encodings).
- `replica_digests`: a hash of each rank's state_dict after training; they must all be equal.

Ranks: "rank 0" is the first process of each machine (`local_rank` 0), as in RecBole; on one machine, the only one.
"""

import contextlib
import hashlib
import logging
import os
import socket
import traceback

import torch
import torch.distributed as dist


# -- backend and device -----------------------------------------------------------------------------------------------
def gpu_ids(gpu_id):
    """RecBole's `gpu_id` ('0,1', '', a tuple or an int) as a list of id strings."""
    if isinstance(gpu_id, (tuple, list)):
        gpu_id = ",".join(map(str, gpu_id))
    text = "" if gpu_id is None else str(gpu_id)
    return [part.strip() for part in text.split(",") if part.strip()]


def choose_backend(gpu_id, cuda_available=None):
    """'nccl' when CUDA is available and `gpu_id` names at least one GPU; 'gloo' (CPU tensors) otherwise."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "nccl" if cuda_available and gpu_ids(gpu_id) else "gloo"


def free_port(host="localhost"):
    """A TCP port that is free now on `host`, for the rendezvous of one run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _int_at_least(settings, key, minimum, fix):
    value = settings.get(key)
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}: {fix}")
    return number


def init_distributed_device(settings):
    """`Config._init_device` for one process of a multi-process run (`settings`: Config.final_config_dict, with
    `local_rank`, `nproc`, `world_size`, `offset`, `ip`, `port` set by the launcher). Joins the process group on
    the backend the device calls for and sets `device`, `single_spec` (False), and quiets every rank but 0."""
    ids = gpu_ids(settings.get("gpu_id"))
    settings["gpu_id"] = ",".join(ids)
    os.environ["CUDA_VISIBLE_DEVICES"] = settings["gpu_id"]  # as RecBole: the listed GPUs become cuda:0..n-1

    launcher_fix = "use run_recbole_reason(..., nproc=N) or --nproc N, which set it."
    nproc = _int_at_least(settings, "nproc", 1, launcher_fix)
    local_rank = _int_at_least(settings, "local_rank", 0, launcher_fix)
    world_size = _int_at_least(settings, "world_size", nproc, "it counts the processes on all machines (>= nproc).")
    offset = _int_at_least(settings, "offset", 0, "the global rank of this machine's first process (0 on one machine).")
    port = _int_at_least(settings, "port", 1, "a free TCP port for the rendezvous (the launcher picks one).")
    if local_rank >= nproc:
        raise ValueError(f"local_rank must be < nproc={nproc}, got {local_rank}: {launcher_fix}")
    if offset + nproc > world_size:
        raise ValueError(
            f"offset + nproc must be <= world_size, got offset={offset}, nproc={nproc}, world_size={world_size}: "
            "lower offset or raise world_size."
        )
    ip = settings.get("ip") or "localhost"

    backend = choose_backend(settings["gpu_id"])
    if backend == "nccl":
        usable = min(len(ids), torch.cuda.device_count())
        if usable < nproc:
            raise ValueError(
                f"nproc={nproc} processes need {nproc} GPUs, but gpu_id='{settings['gpu_id']}' gives {usable} "
                f"usable: list {nproc} GPUs (e.g. --gpu_id={','.join(map(str, range(nproc)))}), lower --nproc, or set "
                "gpu_id: '' to train on the CPU (Gloo)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{ip}:{port}", rank=local_rank + offset, world_size=world_size
        )
    settings.update(
        nproc=nproc, local_rank=local_rank, world_size=world_size, offset=offset, port=port, ip=ip,
        device=device, single_spec=False, backend=backend,
    )
    if local_rank != 0:
        # Rank 0 speaks for the run; the others only report errors and never write the dataset caches.
        settings.update(state="error", show_progress=False, verbose=False, save_dataset=False, save_dataloaders=False)


def is_distributed(config):
    return config["single_spec"] is False


def is_main_process(config):
    """Rank 0, or the only process: the one that writes checkpoints, logs, TensorBoard and caches."""
    return not is_distributed(config) or config["local_rank"] == 0


def barrier(config):
    if not is_distributed(config):
        return
    if config["backend"] == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(config):
    """Rank 0 runs the block first (building and writing any cache); the others wait, then run it (and read it)."""
    if not is_main_process(config):
        barrier(config)
    try:
        yield
    finally:
        if is_distributed(config) and is_main_process(config):
            barrier(config)


def broadcast_from_rank0(obj, config):
    """Rank 0's `obj` on every rank (any picklable object; tensors come back on their original device)."""
    if not is_distributed(config):
        return obj
    device = obj.device if isinstance(obj, torch.Tensor) else None
    holder = [obj.cpu() if device is not None else obj]
    dist.broadcast_object_list(holder, src=0, device=_comm_device(config))
    return holder[0].to(device) if device is not None else holder[0]


def _comm_device(config):
    return torch.device("cuda", torch.cuda.current_device()) if config["backend"] == "nccl" else torch.device("cpu")


def _all_gather(tensor):
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def merge_row_updates(table, before, config):
    """Rows of `table` that any rank changed since `before` (its copy at the previous step), written into every
    rank's table, in rank order. Each rank overwrites only its own batch's rows of a row cache (R2ec's item table);
    one process over the whole batch would have refreshed all of them, so the union is what every rank keeps."""
    device = _comm_device(config)
    changed = (table != before).reshape(len(table), -1).any(dim=1).nonzero().squeeze(1)
    counts = _all_gather(torch.tensor([len(changed)], device=device))
    longest = int(max(count.item() for count in counts))
    if longest == 0:
        return 0
    ids = torch.zeros(longest, dtype=torch.long, device=device)
    rows = torch.zeros((longest, *table.shape[1:]), dtype=table.dtype, device=device)
    ids[: len(changed)] = changed.to(device)
    rows[: len(changed)] = table[changed].to(device)
    all_ids, all_rows = _all_gather(ids), _all_gather(rows)
    with torch.no_grad():
        for count, rank_ids, rank_rows in zip(counts, all_ids, all_rows):
            n = int(count.item())
            table[rank_ids[:n].to(table.device)] = rank_rows[:n].to(table.device)
    return int(sum(count.item() for count in counts))


def state_digest(model):
    """sha1 of a model's state_dict (names, dtypes, shapes and bytes): equal digests = bit-identical replicas."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_digests(model, config):
    """`state_digest` of every rank's model, in rank order (one entry when not distributed)."""
    mine = state_digest(model)
    if not is_distributed(config):
        return [mine]
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    return digests


# -- the trainer ------------------------------------------------------------------------------------------------------
class _NullWriter:
    """TensorBoard writer of ranks > 0: every call is dropped."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _tensorboard_on_rank0_only(main):
    """RecBole's Trainer.__init__ opens a SummaryWriter (and its event file) unconditionally: ranks > 0 get a
    writer that drops everything instead."""
    if main:
        yield
        return
    import recbole.trainer.trainer as recbole_trainer

    original = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = lambda logger: _NullWriter()
    try:
        yield
    finally:
        recbole_trainer.get_tensorboard = original


def wrap_model(model, config):
    """(model, DistributedDataParallel): device_ids=[local_rank] on a GPU, None on the CPU (DDP rejects a device
    id for a CPU module). SyncBatchNorm needs CUDA, so BatchNorm stays per process on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    if config["device"].type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model, DistributedDataParallel(model, device_ids=[config["device"].index])
    return model, DistributedDataParallel(model, device_ids=None)


class DistributedTrainerMixin:
    """Makes any RecBole trainer (and ours) train under DDP on the CPU as on GPUs; a no-op in one process.

    A trainer class may set `ddp_row_synced_buffers`: names of model buffers that a training step overwrites row by
    row with the rows of its own batch (R2ec's `item_table`); before each step every rank gets the rows all ranks
    changed at the last one. (Not defaulted here: this mixin comes first in the MRO and would hide the trainer's.)"""

    def __init__(self, config, model):
        if not is_distributed(config):
            super().__init__(config, model)
            return
        # Build as one process (RecBole's AbstractTrainer would wrap with device_ids=[local_rank], wrong on the
        # CPU), then wrap here.
        main = is_main_process(config)
        config["single_spec"] = True
        try:
            with _tensorboard_on_rank0_only(main):
                super().__init__(config, model)
        finally:
            config["single_spec"] = False
        self.model, self.distributed_model = wrap_model(self.model, config)
        # Checkpoint names carry the local time: every rank must use rank 0's, the only one written.
        self.saved_model_file = broadcast_from_rank0(self.saved_model_file, config)
        self._row_snapshots = {}
        self.replica_digests = None

    def set_reduce_hook(self):
        # Called by RecBole's _train_epoch at the start of every DDP step, before the loss: the right moment to
        # merge the previous step's row updates, then snapshot for the next.
        names = getattr(self, "ddp_row_synced_buffers", ())
        for name in names:
            table, before = getattr(self.model, name), self._row_snapshots.get(name)
            if before is not None and before.shape == table.shape:
                merge_row_updates(table, before, self.config)
        super().set_reduce_hook()
        self._row_snapshots = {name: getattr(self.model, name).detach().clone() for name in names}

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if is_distributed(self.config):
            self.replica_digests = replica_digests(self.model, self.config)
            if len(set(self.replica_digests)) > 1:
                self.logger.error(
                    f"DDP replicas differ after training (state_dict sha1 per rank: {self.replica_digests})"
                )
        return result

    def load_model_weights(self, checkpoint_file):
        # Rank 0 may still be writing the checkpoint the other ranks are about to read.
        barrier(self.config)
        return super().load_model_weights(checkpoint_file)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not is_main_process(self.config):
            return
        # The checkpoint pickles the Config, which must reload in one process (RecBole's load_data_and_model:
        # data_preparation would otherwise build DistributedSamplers without a process group).
        distributed = {key: self.config[key] for key in ("single_spec", "local_rank")}
        self.config["single_spec"], self.config["local_rank"] = True, 0
        try:
            super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        finally:
            for key, value in distributed.items():
                self.config[key] = value


# -- logging ---------------------------------------------------------------------------------------------------------
def init_rank_logger(config):
    """RecBole's `init_logger` (log file + terminal) on rank 0 or the only process; errors to stderr elsewhere.

    Every run gets its own log file and TensorBoard folder, also the second run of a process (a comparison, a
    tuning trial, a Python loop over models): RecBole's `init_logger` ends in `logging.basicConfig`, a no-op once
    the root logger has handlers, and its `get_tensorboard` names the folder after the first file handler, so
    without dropping the previous run's handlers every later run would log into the first run's files."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    if is_main_process(config):
        from recbole.utils import init_logger

        init_logger(config)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"rank {config['local_rank']}: %(levelname)s %(message)s"))
    handler.setLevel(logging.ERROR)
    root.addHandler(handler)
    root.setLevel(logging.ERROR)


# -- the launcher ----------------------------------------------------------------------------------------------------
def _threads_per_process(nproc):
    """CPU cores / processes, unless OMP_NUM_THREADS says otherwise: N processes with all cores each would fight."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def _worker(local_rank, run, model, dataset, config_file_list, config_dict, saved, threads, queue):
    if threads:
        torch.set_num_threads(threads)
    try:
        result = run(model, dataset, config_file_list, {**config_dict, "local_rank": local_rank}, saved)
        if local_rank == 0:
            queue.put(("result", local_rank, result, None))
    except BaseException as error:
        trace = traceback.format_exc()
        try:
            queue.put(("error", local_rank, error, trace))
        except Exception:  # an exception that does not pickle: its text still reaches the launcher
            queue.put(("error", local_rank, RuntimeError(f"{type(error).__name__}: {error}"), trace))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _drain(queue):
    messages = []
    while not queue.empty():
        messages.append(queue.get())
    return messages


def run_distributed(run, model=None, dataset=None, config_file_list=None, config_dict=None, nproc=2, saved=True,
                    world_size=-1, ip="localhost", port=None, group_offset=0):
    """Train and test with `nproc` DDP processes on this machine (NCCL on the GPUs of `gpu_id`, Gloo on the CPU);
    each process calls `run(model, dataset, config_file_list, config_dict, saved)` (the quick start's
    `run_recbole_reason`, passed in: this lower layer never imports the quick start; a module-level function, so
    the spawned processes can import it) and rank 0's result dict is returned, plus `replica_digests`. `world_size`, `ip`,
    `port`, `group_offset`: several machines, as RecBole's `run_recboles` (default: this machine only).

    An exception in any process stops all of them and is raised here (the first one, with its rank noted)."""
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1 (processes on this machine), got {nproc!r}.")
    world_size = nproc if world_size in (-1, None) else world_size
    settings = dict(config_dict or {})
    settings.update(nproc=nproc, world_size=world_size, ip=ip, port=port or free_port(), offset=group_offset)
    queue = mp.get_context("spawn").SimpleQueue()
    args = (run, model, dataset, config_file_list, settings, saved, _threads_per_process(nproc), queue)
    context = mp.start_processes(_worker, args=args, nprocs=nproc, join=False, start_method="spawn")
    messages = []
    try:
        # Drain while waiting: a result bigger than the pipe buffer would otherwise block rank 0 forever.
        while not context.join(timeout=0.5):
            messages += _drain(queue)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
        messages += _drain(queue)
        errors = [message for message in messages if message[0] == "error"]
        if not errors:
            raise
        _, rank, error, trace = errors[0]
        error.add_note(f"(raised in DDP process {rank} of {nproc}; its traceback:\n{trace})")
        raise error from failure
    messages += _drain(queue)
    results = [message[2] for message in messages if message[0] == "result"]
    if not results:
        raise RuntimeError(f"The {nproc} DDP processes ended without an error but rank 0 returned no result.")
    return results[0]
