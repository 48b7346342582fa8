"""Data-parallel training with torchrun: one process per device, and every rank holds the same trie
at every step.

    torchrun --nproc_per_node 8 train_imagenet.py --data-dir /data/imagenet  # 8 GPUs (NCCL)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host:29500 \\
        train_imagenet.py --data-dir /data/imagenet                         # run on both machines
    torchrun --standalone --nproc_per_node 2 train_cifar.py --dataset synthetic --threads 1  # gloo

The paper names "scaling via distributed computing" as a future direction (§7); its growth (Alg. 2)
and pruning (Alg. 3) make that harder than for a static network: the parameter list changes between
steps, and each sample runs only the branches it is routed to (a child can be used on one rank and
not on another in the same step). Gradients go through torch's DistributedDataParallel, rebuilt
whenever the trie changes; the exit logits and routing probabilities the losses need are computed
inside `forward` and returned with the logits (the forward pass's `Record`), so DDP sees every use
of every parameter. What DDP does not know about, the routing statistics that decide growth and
pruning, is synchronised here with torch.distributed collectives:

  wrap             DistributedDataParallel(find_unused_parameters=True) over today's trie, or the
                   model itself
  sync_step        after backward, one all_reduce: the float buffers averaged (EMA usage alpha,
                   sigma^2, split shares and BatchNorm statistics become EMAs over the global
                   batch), the leaf counts that choose Alg. 2's growth target summed; integer
                   buffers take their maximum. Every rank then takes the same growth and pruning
                   decisions, at the same step, from the same numbers.
  broadcast_model  rank 0's weights on every rank: at the start, and after growth (new children
                   are identical)
  shard            a DistributedSampler for training (--batch-size is the global batch, divided
                   evenly among the ranks, so the optimisation matches one process); a strided
                   slice of the validation set
  reduce_log       an epoch's metrics over the ranks (docs/distributed.md); it also checks that
                   the ranks agree
  seed_epoch       runs.seed_epoch per rank (rank 0 draws what one process would), and the
                   sampler's epoch

Rank 0 writes the run directory and prints; the other ranks' stdout goes nowhere. The final test
runs on rank 0. A checkpoint holds nothing of the world size, so a run resumes on any number of
processes. When a process dies, torchrun stops the job; each survivor ends with one line on stderr
(`Stopped`) saying where the last checkpoint is, whether it learns it from a failed collective or
from torchrun's SIGTERM. A collective that waits longer than TIMEOUT (a hung rank) fails the same
way. Without torchrun (WORLD_SIZE unset or 1) every function is a no-op.
"""

import atexit
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import runs
from trie import JulietNet

# The longest wait in a collective; rank 0's checkpoint writes take seconds.
TIMEOUT = timedelta(minutes=10)
# The run directory for the last line, and the process that handles SIGTERM.
_job = {"out": None, "pid": None, "stopping": False}


class Stopped(Exception):
    """Another process of the job failed or torchrun stopped this one; the last checkpoint stays."""


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 of a torchrun job, or the only process: the one that writes the run directory."""
    return rank() == 0


# ----------------------------------------------------------------------------- joining the job


def setup(args) -> None:
    """Join the torchrun job of this process if it has several (WORLD_SIZE > 1): one CUDA device per
    local rank and NCCL, or gloo on CPU. Call after runs.setup_device (args.device is then "cpu"
    or "cuda...")."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n == 1 or dist.is_initialized():
        return
    if args.batch_size % n:
        raise runs.UsageError(f"--batch-size {args.batch_size} is the global batch; it must split "
                              f"evenly over the {n} processes of the job")
    cuda = args.device.startswith("cuda")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        gpus = torch.cuda.device_count()
        if local >= gpus:
            raise runs.UsageError(f"torchrun started local rank {local}, but this machine has "
                                  f"{gpus} GPU(s); use --nproc_per_node <= the GPU count")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device(args.device) if cuda else None)
    atexit.register(dist.destroy_process_group)
    out = [args.out]
    # A default run name holds each process's clock: rank 0's is the job's.
    _collective(dist.broadcast_object_list, out, 0)
    args.out = out[0]
    _job.update(out=args.out, pid=os.getpid())
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.excepthook = _one_line_for_stopped
    if dist.get_rank():  # rank 0 speaks for the job; the others' errors still reach stderr
        args.quiet = True
        sys.stdout = open(os.devnull, "w")


def _stopped(reason: str) -> Stopped:
    _job["stopping"] = True  # a SIGTERM that follows a failed collective adds nothing
    return Stopped(f"rank {rank()}: {reason}; the last checkpoint is in {_job['out']}: continue "
                   f"with --resume {_job['out']} (on any number of processes)")


def _on_sigterm(signum, frame):
    if os.getpid() != _job["pid"]:  # a DataLoader worker inherited this handler: just go
        os._exit(1)
    if not _job["stopping"]:
        raise _stopped("torchrun stopped this process (SIGTERM), as it does when another process "
                       "of the job fails")


def _one_line_for_stopped(kind, value, tb, default=sys.excepthook):
    if issubclass(kind, Stopped):
        print(runs.error_line(str(value)), file=sys.stderr, flush=True)
    else:
        default(kind, value, tb)


def _collective(fn, *args, **kwargs):
    """A torch.distributed call; a failure (a peer died, or TIMEOUT passed) becomes `Stopped`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
        # e.g. "[.../tcp/pair.cc:545] Read error [127.0.0.1]:58521: Connection reset by peer. ..."
        cause = str(e).strip().splitlines()[0].split("] ", 1)[-1].split(". ")[0]
        raise _stopped(f"a collective failed ({cause}): another process of the job has "
                       "stopped") from None


# ----------------------------------------------------------------------------- the training step


def _all_reduce(tensors: list, op) -> None:
    """All-reduce `tensors` in place through one flat copy: one collective, not one per tensor."""
    if tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])  # (sum of numel,)
        _collective(dist.all_reduce, flat, op=op)
        for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(v.view_as(t))


def wrap(model):
    """`model` in DistributedDataParallel under torchrun (itself in one process). DDP averages the
    gradients during backward, overlapping communication with it; a branch no rank used keeps grad
    None, as in one process (find_unused_parameters: routing leaves some unused on some ranks). DDP
    fixes its parameter list when built, so the training loop wraps again after growth, pruning or
    freezing; building it broadcasts rank 0's parameters and buffers. Buffers are not broadcast at
    each forward: sync_step averages them after each step. When a step happens to use every
    parameter, torch prints a one-time notice about find_unused_parameters."""
    if world() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True, forward_sync_buffers=False)


@torch.no_grad()
def sync_step(model, leaf_counts: dict) -> dict:
    """After backward, before the optimizer step: the float buffers averaged over the ranks (EMA
    usage alpha, sigma^2 and BatchNorm statistics become EMAs over the global batch), integer
    buffers at their maximum, and the leaf counts of this rank's `Record` summed, so that Alg. 2
    grows at the leaf most samples of the global batch reached. Returns the summed counts (in one
    process: `leaf_counts` as they are)."""
    if world() == 1:
        return leaf_counts
    floats = [b for b in model.buffers() if b.is_floating_point()]
    # the node ids, in the same order on every rank
    ids = [node.node_id for node in model.nodes()] if isinstance(model, JulietNet) else []
    device = next(model.parameters()).device
    counts = torch.tensor([leaf_counts.get(i, 0) for i in ids], dtype=torch.float32, device=device)
    _all_reduce([*floats, counts], dist.ReduceOp.SUM)
    for b in floats:
        b.div_(world())
    # BatchNorm's num_batches_tracked, Alg. 3's low_epochs (equal on every rank anyway)
    _all_reduce([b for b in model.buffers() if not b.is_floating_point()], dist.ReduceOp.MAX)
    return {i: int(c) for i, c in zip(ids, counts.tolist()) if c}


@torch.no_grad()
def broadcast_model(model) -> None:
    """Rank 0's parameters and buffers on every rank: at the start (as DDP does) and after growth,
    whose fresh children each rank drew from its own random stream."""
    if world() == 1:
        return
    for t in [*model.parameters(), *model.buffers()]:  # the same order on every rank
        _collective(dist.broadcast, t.detach(), 0)


# ----------------------------------------------------------------------------- data

# What a rank's loader keeps of the loader it shards.
LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "worker_init_fn",
                   "generator", "prefetch_factor", "persistent_workers")


def shard(loader: DataLoader, seed: int) -> DataLoader:
    """This rank's part of `loader`. A shuffling (training) loader gets a DistributedSampler and
    batches of batch_size / world, so --batch-size stays the global batch (Table 2: 128,
    Table 3: 256) and every rank runs the same number of steps; an evaluation loader gets every
    world-th sample, unpadded."""
    n, r = world(), rank()
    if n == 1:
        return loader
    train = isinstance(loader.sampler, RandomSampler)  # a shuffling loader: the training one
    sampler = DistributedSampler(loader.dataset, n, r, shuffle=True, seed=seed) if train else \
        range(r, len(loader.dataset), n)
    batch = loader.batch_size // n if train else loader.batch_size
    kept = {k: getattr(loader, k) for k in LOADER_SETTINGS}
    return DataLoader(loader.dataset, batch_size=batch, sampler=sampler, **kept)


def seed_epoch(seed: int, epoch: int, loader) -> None:
    """runs.seed_epoch with the rank mixed in: augmentation and Gumbel noise differ between ranks,
    and rank 0 draws what one process would; a DistributedSampler gets the epoch (one permutation,
    shared out among the ranks)."""
    runs.seed_epoch(seed + 1_000_003 * rank(), epoch, loader)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


# ----------------------------------------------------------------------------- metrics

# fields of which each rank holds a part: summed
SUMMED = ("_samples", "_leaf_counts", "_node_visits", "_class_samples", "_node_throughput_img_s")
AGREED = ("events", "structure")  # decisions that every rank takes from the same reduced statistics


def _combine(key: str, logs: list[dict]):
    values = [log[key] for log in logs]
    if key.endswith(SUMMED):  # before the test for equality: 10 samples on each rank are 20
        return sum(values) if not isinstance(values[0], dict) else _sum_dicts(values)
    if all(v == values[0] for v in values):
        return values[0]
    s = next((s for s in key.split("_")[:2] if s in ("train", "val")), None)  # its part, if any
    if key.startswith("throughput_"):  # all the ranks' images over the slowest rank's time
        return sum(log[f"{s}_samples"] for log in logs) / max(log[f"time_{s}_s"] for log in logs)
    if key.startswith("time_") or key.endswith("_seconds") or key == "peak_memory_bytes":
        return max(values)
    if key.startswith("energy_") and not isinstance(values[0], str):
        # energy per GPU, summed; J/image too: each rank divided by the global image count
        return sum(values)
    if not isinstance(values[0], (int, float, dict)) or isinstance(values[0], bool):
        return values[0]  # e.g. an NVML status: rank 0's
    # per-sample means (loss, top-1, executed MACs, ...); per-class depths by class counts
    count = f"{s}_class_samples" if key.endswith("_class_depth") else f"{s}_samples"
    weights = [log.get(count, 1) for log in logs]
    if not isinstance(values[0], dict):
        return sum(v * w for v, w in zip(values, weights)) / max(1, sum(weights))
    # per-key weights: a rank's count of the key's samples, or its sample count for each of its keys
    weights = [w if isinstance(w, dict) else dict.fromkeys(v, w) for v, w in zip(values, weights)]
    return {k: sum(v.get(k, 0) * w.get(k, 0) for v, w in zip(values, weights)) /
            max(1, sum(w.get(k, 0) for v, w in zip(values, weights) if k in v))
            for k in _sum_dicts(values)}


def _sum_dicts(dicts: list[dict]) -> dict:
    # keys in order of first appearance, rank 0 first: the same on every rank
    return {k: sum(d.get(k, 0) for d in dicts) for k in dict.fromkeys(k for d in dicts for k in d)}


def reduce_log(log: dict) -> dict:
    """An epoch's record over the ranks, the same on every rank: counts summed, per-sample means
    weighted by each rank's samples (per-class depths by its class counts), times and peak memory
    at their maximum, throughput = all images / slowest time, energy summed over GPUs. The ranks
    must agree on growth/pruning and structure."""
    if world() == 1:
        return log
    logs = [None] * world()
    _collective(dist.all_gather_object, logs, log)
    for key in AGREED:
        if any(other.get(key) != logs[0].get(key) for other in logs):
            raise RuntimeError(f"the ranks' {key} differ: the trie is no longer the same on every "
                               "rank")
    return {k: _combine(k, logs) for k in logs[0]}
