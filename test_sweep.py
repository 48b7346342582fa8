"""sweep.py: the §6.2 Optuna study (continue, prune, parallel workers, heartbeats, bad input) and the §5.3 grid."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
import torch

import measure
import plots
import sweep
from backbones import static_model
from conftest import REPO

State = optuna.trial.TrialState
STATIC_R18 = measure.paper_macs(static_model("resnet18", num_classes=10), input_size=32)[0]
TINY = ["--epochs", "1", "--dataset", "synthetic", "--backbone", "resnet18", "--",
        "--set", "synthetic_size=120", "--batch-size", "16", "--workers", "0", "--set", "limit_batches=2"]


@pytest.fixture
def one_thread():
    """The runs here are tiny and overhead-bound; one thread avoids OpenMP oversubscription on a busy machine
    (2 threads next to another training job made each run ~8x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_study(out) -> optuna.Study:
    return optuna.load_study(study_name="juliet", storage=f"sqlite:///{out}/study.db")


def scripted_runs(monkeypatch, curves):
    """train_cifar.main replaced by runs that report the given val top-1 per epoch (one curve per run) at
    1 M executed MACs per sample, against a 2 M static backbone: c = 0.5."""
    runs = iter(curves)

    def main(args, on_epoch=None):
        os.makedirs(args.out)
        curve = next(runs)
        for epoch, top1 in enumerate(curve, 1):
            on_epoch({"epoch": epoch, "val_top1": top1, "val_executed_macs_per_sample": 1e6,
                      "flops_paper_convention_macs": 1e6, "params": 10})
        return {"test_top1": curve[-1], "test_executed_macs_per_sample": 1e6, "flops_paper_convention_macs": 1e6,
                "wall_time_s": 0.0}

    monkeypatch.setattr(sweep.train_cifar, "main", main)
    monkeypatch.setattr(sweep, "static_macs", lambda run_dir: 2e6)


@pytest.mark.usefixtures("one_thread")
def test_sweep_finishes_then_the_same_command_continues_the_study(tmp_path, monkeypatch, capsys):
    """The study's bookkeeping, on scripted runs (the jobs and grid tests below train real ones)."""
    scripted_runs(monkeypatch, [[60], [70], [65], [50]])
    out = tmp_path / "sweep"
    flags = ["--epochs", "1", "--dataset", "synthetic", "--out", str(out)]
    sweep.main(["--trials", "3", *flags])
    study = load_study(out)
    first = [(t.number, t.state, t.params, t.value, t.datetime_start) for t in study.trials]
    assert [t.state for t in study.trials] == [State.COMPLETE] * 3  # 1 epoch: never pruned at the last epoch
    best = json.loads((out / "best.json").read_text())
    assert set(best["params"]) == {dest for dest, *_ in sweep.SPACE} and best["objective_L"] == study.best_value
    m = best["metrics"]
    assert m["accuracy"] == 0.70 and m["static_macs"] == 2e6 and m["c"] == 0.5 == m["val_executed_macs"] / 2e6
    assert best["objective_L"] == pytest.approx(1 - 0.70 + 0.1 * 0.5)  # §6.2, default lambda
    assert {"params", "wall_time_s", "run_dir", "test_top1"} <= set(m) and os.path.isdir(m["run_dir"])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "importances.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert sum(line.startswith(f"| {k} | COMPLETE |") for line in printed.splitlines() for k in range(3)) == 3

    sweep.main(["--trials", "4", *flags])
    study = load_study(out)
    assert len(study.trials) == 4 and all(t.state in sweep.FINISHED for t in study.trials)
    assert [(t.number, t.state, t.params, t.value, t.datetime_start) for t in study.trials[:3]] == first
    assert study.trials[3].params != study.trials[0].params  # resumed sampler does not replay trial 0
    assert (out / "trial_3").is_dir() and len((out / "trials.md").read_text().splitlines()) == 6


@pytest.mark.usefixtures("one_thread")
def test_median_pruner_prunes_a_trial_below_the_median(tmp_path, monkeypatch):
    scripted_runs(monkeypatch, [[80, 85, 90], [80, 85, 90], [10, 10, 10]])
    out = tmp_path / "sweep"
    sweep.main(["--trials", "3", "--epochs", "3", "--dataset", "synthetic", "--backbone", "resnet18",
                "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "0", "--out", str(out)])
    t = load_study(out).trials
    assert [x.state for x in t] == [State.COMPLETE, State.COMPLETE, State.PRUNED]
    assert t[0].value == pytest.approx(1 - 0.90 + 0.1 * 0.5) and t[0].intermediate_values[1] == pytest.approx(0.25)
    assert list(t[2].intermediate_values) == [1] and t[2].user_attrs["epochs_run"] == 1  # stopped after epoch 1
    assert (out / "pareto.png").is_file()


@pytest.mark.usefixtures("one_thread")
def test_a_trial_whose_heartbeat_stopped_is_failed_not_counted_and_retried(tmp_path, monkeypatch, capsys):
    scripted_runs(monkeypatch, [[50]] * 4)
    out = tmp_path / "sweep"
    flags = ["--epochs", "1", "--dataset", "synthetic", "--heartbeat", "1", "--out", str(out)]
    sweep.main(["--trials", "2", *flags])
    storage = optuna.storages.RDBStorage(f"sqlite:///{out}/study.db")
    study = optuna.load_study(study_name="juliet", storage=storage)
    lost = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)})  # trial 2: RUNNING
    storage.record_heartbeat(lost._trial_id)  # one beat, then silence: its worker was killed just now
    sweep.main(["--trials", "3", *flags])  # nothing to start: waits until 3 beats (1 s) are missed, then retries
    t = load_study(out).trials
    assert [x.state for x in t] == [State.COMPLETE, State.COMPLETE, State.FAIL, State.COMPLETE]
    assert t[3].system_attrs["failed_trial"] == 2 and t[3].params["lr"] == lost.params["lr"]  # the retry
    assert t[3].user_attrs["run_dir"] == str(out / "trial_3") and (out / "trial_3").is_dir()  # its own run dir
    assert not (out / "trial_2").exists()
    err = capsys.readouterr().err
    assert "waiting for trial(s) [2], running in other workers" in err and "trial 2 lost its worker" in err
    with pytest.raises(SystemExit) as e:
        sweep.main(["--trials", "4", "--lam", "0.5", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("sweep.py: error: ") and "other settings (lam: 0.1 -> 0.5)" in err
    assert len(load_study(out).trials) == 4


def running(out) -> dict:
    """{worker pid: (trial number, whether it trains: its run directory holds its config)} over the study's
    running trials. Reads only: the workers create the storage."""
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{out}/study.db", skip_table_creation=True,
                                             skip_compatibility_check=True)
        trials = optuna.load_study(study_name="juliet", storage=storage).get_trials(states=(State.RUNNING,))
        return {int(t.user_attrs["worker"].split(":")[-1]):
                (t.number, os.path.isfile(os.path.join(t.user_attrs["run_dir"], "config.json")))
                for t in trials if "worker" in t.user_attrs}
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):  # not made yet
        return {}


def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried_once(tmp_path):
    """Two sweep.py processes on one SQLite study run different trials at the same time; the one killed
    mid-trial (SIGKILL: no cleanup) leaves a FAIL trial that is not counted, and the other goes on and runs
    its retry."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(REPO, "sweep.py"), "--trials", "2", "--heartbeat", "1", "--out", str(out),
           *TINY[:-2], "--threads", "1"]  # whole runs: a trial lasts long enough to be killed in the middle
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    a, b = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2))
    try:
        deadline = time.time() + 90
        while not ((busy := running(out)).keys() == {a.pid, b.pid} and busy[a.pid][1]) and time.time() < deadline:
            time.sleep(0.2)  # until both run a trial at once, and a's trains
        assert busy.keys() == {a.pid, b.pid} and busy[a.pid][1], busy
        a.send_signal(signal.SIGKILL)
        killed = busy[a.pid][0]
        err = b.communicate(timeout=120)[1]
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
    assert b.returncode == 0, err
    assert f"trial {killed} lost its worker" in err
    trials = load_study(out).trials
    assert [t.number for t in trials if t.state == State.FAIL] == [killed]
    assert sum(t.state in sweep.FINISHED for t in trials) == 2 and len(trials) == 3  # the FAIL is not counted
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed)
    assert retry.state == State.COMPLETE and retry.params == trials[killed].params
    assert retry.user_attrs["worker"].endswith(f":{b.pid}")
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == 3 and all(os.path.isdir(d) for d in dirs)  # one run dir per trial, never reused
    rows = [r.split(" | ")[0] for r in (out / "trials.md").read_text().splitlines()[2:]]
    assert sorted(rows) == [f"| {k}" for k in range(3)]  # every trial once


@pytest.mark.usefixtures("one_thread")
def test_jobs_runs_worker_processes_on_one_study_with_a_share_of_the_threads(tmp_path):
    out = tmp_path / "sweep"
    sweep.main(["--trials", "2", "--jobs", "2", "--heartbeat", "1", "--out", str(out), *TINY])
    trials = load_study(out).trials
    assert [t.state for t in trials] == [State.COMPLETE] * 2
    assert all(not t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in trials)  # ran in the workers
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [json.loads((out / f"trial_{k}" / "config.json").read_text())["threads"] for k in range(2)] == [threads] * 2
    assert len((out / "trials.md").read_text().splitlines()) == 4
    assert json.loads((out / "best.json").read_text())["metrics"]["static_macs"] == STATIC_R18  # c's denominator


@pytest.mark.usefixtures("one_thread")
def test_ablation_grid_with_limit_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    sweep.main(["--ablations", "--limit", "2", "--out", str(out), *TINY])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| transformer |")]
    assert [r.split(" | ")[:3] for r in rows] == [["| transformer", "top1", "both"], ["| transformer", "top1",
                                                                                         "grow-only"]]
    assert (out / "transformer-top1-grow-only" / "final.json").is_file()
    assert (out / "ablations.md").read_text().count("| transformer |") == 2
    assert (out / "selector_curves.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a finished combination ran again")

    monkeypatch.setattr(sweep.train_cifar, "main", no_training)
    sweep.main(["--ablations", "--limit", "2", "--out", str(out), *TINY])
    assert sum(r.startswith("| transformer |") for r in capsys.readouterr().out.splitlines()) == 2


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bad", [["--grow-range", "0.9", "0.1"], ["--lr-range", "0", "1e-3"], ["--trials", "0"],
                                 ["--prune-range", "0.1", "1.5"], ["--", "--lr", "0.1"], ["--jobs", "0"],
                                 ["--storage", "not-a-url"], ["--storage", "redis://localhost"],
                                 ["--ablations", "--jobs", "2"], ["--heartbeat", "0"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--out", str(out), "--dataset", "synthetic", *bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("sweep.py: error: ")
    assert not out.exists()


@pytest.mark.usefixtures("one_thread")
def test_fig3_line_per_selector_is_its_top1_both_run_else_the_mean(tmp_path):
    runs = {"mlp-gumbel-off": [10, 20], "mlp-top1-off": [30, 40, 50], "conv-top1-both": [50, 60],
            "conv-gumbel-both": [0, 0]}
    for name, curve in runs.items():
        os.makedirs(tmp_path / name)
        for epoch, top1 in enumerate(curve, 1):
            (tmp_path / name / f"epoch_{epoch}.json").write_text(json.dumps({"epoch": epoch, "val_top1": top1}))
    grid = [("mlp", "gumbel", "off"), ("mlp", "top1", "off"), ("conv", "top1", "both"), ("conv", "gumbel", "both")]
    grid.append(("transformer", "top1", "both"))  # in the grid, never ran
    assert plots.selector_curve(str(tmp_path), grid, "mlp") == ({1: 20, 2: 30, 3: 50}, "mlp (mean of 2 runs)")
    assert plots.selector_curve(str(tmp_path), grid, "conv") == ({1: 50, 2: 60}, "conv (top1, both)")
    assert plots.selector_curve(str(tmp_path), grid, "transformer") is None
    plots.plot_selector_curves(str(tmp_path), grid)
    assert (tmp_path / "selector_curves.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_pareto_front_keeps_points_nobody_beats_on_both_axes():
    pts = [(10, 80), (5, 70), (20, 90), (12, 75), (5, 60), (30, 90)]  # (MACs, accuracy)
    assert plots.pareto_front(pts) == [1, 0, 2]
