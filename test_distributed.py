"""Data-parallel training under torchrun (distributed.py), two CPU processes with gloo: the ranks grow and prune the
same trie at the same steps and end bit-identical; a rank that dies stops the job with one line, and the run
resumes on one process."""

import glob
import os
import subprocess
import sys

import torch

import train_cifar
from conftest import REPO, read_json

# Each rank runs train_cifar.main; wrapping fit (test-side only) lets every rank save what it holds at the end.
RUNNER = """
import os, signal, sys, torch
import distributed, train_cifar

rank, dump, kill_at = int(os.environ["RANK"]), os.environ["DUMP"], int(os.environ.get("KILL_AT", 0))
fit, sync_step, wrap, steps, wrapped = train_cifar.fit, distributed.sync_step, distributed.wrap, [0], []

def wrap_and_note(model):
    ddp = wrap(model)
    wrapped.append((type(ddp).__name__, ddp.module is model, len(list(model.parameters()))))
    return ddp

def fit_and_dump(model, loaders, args, progress, state, on_epoch=None):
    fit(model, loaders, args, progress, state, on_epoch)
    torch.save({"structure": model.structure(), "model": model.state_dict(), "opt": state["optimizer"].state_dict(),
                "train_indices": list(loaders[0].sampler), "val_indices": list(loaders[1].sampler),
                "wrapped": wrapped},
               os.path.join(dump, f"rank{rank}.pt"))

def sync_or_die(model, *rest):
    steps[0] += 1
    if rank == 1 and steps[0] == kill_at:  # mid-epoch, between backward and the optimizer step
        os.kill(os.getpid(), signal.SIGKILL)
    return sync_step(model, *rest)

train_cifar.fit, distributed.sync_step, distributed.wrap = fit_and_dump, sync_or_die, wrap_and_note
train_cifar.main(train_cifar.parse_args(sys.argv[1:]))
"""
ARGS = ["--grow-prune", "both", "--dataset", "synthetic", "--set", "synthetic_size=200", "--batch-size", "16",
        "--workers", "0", "--quiet", "--threads", "1", "--selector", "mlp", "--grow-every", "2", "--theta-grow",
        "0", "--prune-every", "2", "--t-min", "1", "--seed", "3", "--set", "stop_go=selector",
        "--set", "limit_batches=4"]  # 4 steps an epoch; grow at even steps. The default statistic and sibling


def torchrun(tmp_path, *argv, kill_at=0):
    """python -m torch.distributed.run --nproc_per_node 2; each rank's stdout/stderr goes to its own log file."""
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=REPO, DUMP=str(tmp_path), KILL_AT=str(kill_at), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3", str(tmp_path / "runner.py"), *ARGS, *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = {r: open(glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / str(r) / "stderr.log"))[0]).read()
            for r in (0, 1)}
    return proc, logs


def node_ids(spec: dict) -> list[str]:
    return [spec["id"]] + [i for c in spec["children"] for i in node_ids(c)]


def test_two_ranks_grow_and_prune_the_same_trie_and_end_bit_identical(tmp_path):
    out = tmp_path / "run"
    proc, logs = torchrun(tmp_path, "--epochs", "3", "--out", str(out))
    assert proc.returncode == 0, logs
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # the ranks saw different data: a DistributedSampler split of the training set, a strided val split
    assert not set(a["train_indices"]) & set(b["train_indices"]) and len(a["train_indices"]) == 90
    assert sorted(a["val_indices"] + b["val_indices"]) == list(range(20))
    # epoch 1 grows, epoch 2 prunes (Alg. 3 every 2 epochs), epoch 3 grows children that live to the end
    events = [e for k in (1, 2, 3) for e in read_json(out / f"epoch_{k}.json")["events"]]
    assert {e["kind"] for e in events} == {"grow", "prune"}, events
    assert {e["statistic"] for e in events if e["kind"] == "grow"} == {"split_share"}  # the default recipe's
    survivors = {e["node"] for e in events if e["kind"] == "grow"} & set(node_ids(a["structure"]["root"]))
    assert survivors, events  # so the comparison below covers weights that were drawn after the start
    assert a["structure"] == b["structure"]
    # torch's DistributedDataParallel averaged the gradients, rebuilt after each change of the parameter list
    assert a["wrapped"] == b["wrapped"] and {(kind, inner) for kind, inner, _ in a["wrapped"]} == \
        {("DistributedDataParallel", True)}
    assert len({n for *_, n in a["wrapped"]}) > 1 and len(a["wrapped"]) > 3, a["wrapped"]  # epochs + growth
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # weights and statistics (alpha, sigma^2, BatchNorm) bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    # rank 0 wrote the run directory: its checkpoint is what every rank holds
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["structure"] == a["structure"] and all(torch.equal(ckpt["model"][k], a["model"][k]) for k in a["model"])
    # metrics cover both ranks' samples: 2 x 32 training images (4 steps of 2 x 8), all 20 validation images
    epoch = read_json(out / "epoch_3.json")
    assert (epoch["train_samples"], epoch["val_samples"], sum(epoch["val_leaf_counts"].values())) == (64, 20, 20)
    assert read_json(out / "final.json")["test_samples"] == 40


def test_a_dead_rank_stops_the_job_with_one_line_and_one_process_resumes(tmp_path):
    out = tmp_path / "run"
    proc, logs = torchrun(tmp_path, "--epochs", "2", "--out", str(out), kill_at=6)  # step 2 of epoch 2
    assert proc.returncode != 0
    lines = [line for line in logs[0].strip().splitlines()  # torch's own one-time C++ notice, not ours
             if "find_unused_parameters=True was specified" not in line]
    assert len(lines) == 1 and lines[0].startswith("runner.py: error: rank 0: "), logs[0]
    assert f"--resume {out}" in lines[0]
    assert (out / "epoch_1.json").exists() and not (out / "epoch_2.json").exists()
    final = train_cifar.main(train_cifar.parse_args(["--resume", str(out), "--quiet", "--workers", "0"]))
    assert read_json(out / "epoch_2.json")["step"] == 8 and final["epochs"] == 2
