"""sweep.py: the §6.2 cost-aware Optuna search and the §5.3 ablation grid, each run a normal
train_cifar run (docs/sweeps.md).

    python sweep.py --trials 50 --epochs 40 --out runs/sweep      # §6.2: 50 trials, CIFAR-10
    python sweep.py --trials 60 ... (same flags)                  # continues the study: 10 more
    python sweep.py --jobs 8 [--storage postgresql://user:pw@host/db] ...  # 8 workers (per machine)
    python sweep.py --ablations --epochs 40 --out runs/ablations [--limit N]  # §5.3, Fig. 3
    python sweep.py ... -- --set synthetic_size=2000 --workers 0  # after --: train_cifar flags

Sweep (§6.2). Optuna minimises the paper's single weighted objective L = (1 - accuracy) + lambda c:
val top-1 as a fraction, c = expected executed MACs per val sample (README "Results") over the
static backbone's (L stays scalar so that Optuna can prune; the parts are user attributes). A
trial's value is L at its last epoch. TPE, seeded per trial number; a MedianPruner sees L every
epoch (from half of --epochs on, never the last). Trial k trains in DIR/trial_k; a larger --trials
runs only the missing finished (complete or pruned) trials. Writes best.json, trials.md, pareto.png,
importances.png.
Workers, any number, share one study in an Optuna RDB storage (default DIR/study.db, SQLite) and
beat its heartbeat while they train: a dead worker's trial is FAIL, never counted, and retried.

Ablations (§5.3): selector x routing x grow/prune (SELECTORS, POLICIES, MODES) in
DIR/<selector>-<policy>-<mode>; finished runs are skipped, interrupted ones resumed. Writes
ablations.md (printed), selector_curves.png (Fig. 3)."""

import argparse
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
import warnings
from functools import lru_cache

import optuna
import sqlalchemy
import torch
from tqdm import tqdm

import data
import measure
import plots
import runs
import train_cifar
from backbones import BACKBONES, static_model
from grow_prune import MODES
from routers import SELECTORS
from trie import POLICIES

State = optuna.trial.TrialState
FINISHED = (State.COMPLETE, State.PRUNED)
# Flags that say how and where to run, not what the study is: may differ between workers, reruns.
RUN_ONLY = ("trials", "ablations", "limit", "out", "pruner_startup_trials", "pruner_warmup_epochs",
            "storage", "study_name", "jobs", "heartbeat")

# §6.2: "maximum depth, grow threshold, pruning interval, pruning threshold, learning rate, and
# weight decay" as (train_cifar dest, flag, type, default range, log scale, allowed interval, help).
# Every default range holds the paper's best trial (depth 2, theta_grow ~0.91, E_prune 2,
# theta_prune ~0.65).
SPACE = (("max_depth", "--depth-range", int, (1, 4), False, (0, 100),
          "deepest node of growth (Alg. 2); §6.2 best: 2"),
         ("theta_grow", "--grow-range", float, (0.1, 0.95), False, (0.0, 1.0),
          "theta_grow (Table 2: 0.4; §6.2 best: ~0.91)"),
         ("prune_every", "--prune-every-range", int, (1, 5), False, (1, 10**6),
          "E_prune, epochs (Table 2: 3; §6.2 best: 2)"),
         ("theta_prune", "--prune-range", float, (0.01, 0.7), False, (0.0, 1.0),
          "theta_prune (Table 2: 0.1; §6.2 best: ~0.65)"),
         ("lr", "--lr-range", float, (1e-4, 3e-3), True, (0.0, float("inf")),
          "Adam lr, log scale (Table 2: 1e-3)"),
         ("wd", "--wd-range", float, (1e-6, 1e-3), True, (0.0, float("inf")),
          "weight decay, log scale (Table 2: 1e-5)"))
OWNED = {"--out", "--resume", "--eval-only", "--epochs", "--dataset", "--backbone", "--seed",
         "--selector", "--policy", "--grow-prune", *(f"--{d.replace('_', '-')}" for d, *_ in SPACE)}


def train_argv(args, out: str, **flags) -> list[str]:
    """train_cifar's argv for one run: sweep.py's flags, the per-run ones, then the pass-through."""
    argv = ["--dataset", args.dataset, "--backbone", args.backbone, "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--quiet", "--out", out]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + args.train_args


# ----------------------------------------------------------------------------- the §6.2 objective


@lru_cache
def static_macs(run_dir: str) -> float:
    """The normaliser of c: the static backbone's MACs per sample (THOP is exact for it)."""
    c = runs.read_json(os.path.join(run_dir, "config.json"))
    return measure.paper_macs(static_model(c["backbone"], c["num_classes"]), c["input_size"])[0]


def objective(trial, args) -> float:
    """One trial's run; each epoch's L goes to the pruner, its metrics to the trial's attributes."""
    # TPE seeded per trial number, not per process: workers started together draw other trials
    trial.study.sampler = optuna.samplers.TPESampler(seed=args.seed + trial.number)
    params = {}  # a retried trial keeps the parameters it had
    for dest, flag, typ, _, log, *_ in SPACE:
        suggest = trial.suggest_int if typ is int else trial.suggest_float
        params[dest] = suggest(dest, *getattr(args, flag[2:].replace("-", "_")), log=log)
    run_dir = os.path.join(args.out, f"trial_{trial.number}")  # numbers, so dirs, never reused
    # a retry inherits the failed trial's attributes: overwrite them
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("run_dir", run_dir)
    t0, last = time.perf_counter(), {}

    def on_epoch(log: dict) -> None:
        acc, base = log["val_top1"] / 100, static_macs(run_dir)
        # --static: all of it
        macs = log.get("val_executed_macs_per_sample", log["flops_paper_convention_macs"])
        last.update(L=(1 - acc) + args.lam * macs / base, accuracy=acc, c=macs / base,
                    val_executed_macs=macs, static_macs=base, params=log["params"],
                    epochs_run=log["epoch"], wall_time_s=time.perf_counter() - t0, run_dir=run_dir)
        for k, v in last.items():
            trial.set_user_attr(k, v)
        trial.report(last["L"], log["epoch"])
        # A finished run costs only its test pass now: never prune at the last epoch.
        if log["epoch"] < args.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"epoch {log['epoch']}: L={last['L']:.4f} is worse than "
                                     "the median")

    argv = train_argv(args, run_dir, grow_prune="both", **params)  # §6.2 sweeps grow/prune: on
    final = train_cifar.main(train_cifar.parse_args(argv), on_epoch=on_epoch)
    for k in ("test_top1", "test_executed_macs_per_sample", "flops_paper_convention_macs",
              "wall_time_s"):
        trial.set_user_attr(k, final[k])
    return last["L"]  # the final epoch's objective: the model the run keeps


def retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's heartbeat_stale_trial_callback: its trial's worker stopped beating."""
    print(f"trial {trial.number} lost its worker {trial.user_attrs.get('worker')}: FAIL, not "
          "counted; its parameters are queued for a retry", file=sys.stderr)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, trial)  # WAITING copy


def open_study(args) -> optuna.Study:
    sqlite = args.storage.startswith("sqlite")
    if sqlite and (db := sqlalchemy.engine.make_url(args.storage).database):
        os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    # SQLite: wait for the file lock; only our BEGIN below starts transactions
    make = lambda: optuna.storages.RDBStorage(
        args.storage, {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {},
        heartbeat_interval=args.heartbeat, grace_period=3 * args.heartbeat,
        heartbeat_stale_trial_callback=retry_stale)
    try:
        storage = make()
    except sqlalchemy.exc.SQLAlchemyError:
        # workers started at once race to create a new storage's tables: the loser finds them
        # made; a server that cannot be reached fails again, in guarded()
        time.sleep(1)
        storage = make()
    if sqlite:
        # sqlite3 reads outside transactions, so two workers could both fail one stale trial and
        # queue two retries; BEGIN IMMEDIATE makes each transaction exclusive, as row locks do.
        sqlalchemy.event.listen(storage.engine, "begin",
                                lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    study = optuna.create_study(
        storage=storage, study_name=args.study_name, direction="minimize", load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                           n_warmup_steps=args.pruner_warmup_epochs))
    # What the study means, not where or how fast its runs go: workers may differ in --device,
    # --data-dir, ... Stored as JSON: tuples become lists.
    train = {k: v for k, v in vars(train_cifar.parse_args(train_argv(args, args.out))).items()
             if k not in (*runs.RUNTIME_FLAGS, "out", "explicit")}
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in RUN_ONLY}
                                     | {"train_args": train}))
    saved = study.user_attrs.get("settings", settings)
    if saved != settings:  # L and the trials would not be comparable
        diff = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in settings.items()
                         if saved.get(k) != v)
        raise runs.UsageError(f"{args.out} holds a study made with other settings ({diff}); "
                              f"rerun with the same flags or pick another --out")
    study.set_user_attr("settings", settings)
    return study


def work(args, bar) -> None:
    """One worker: trials until --trials are finished, at most as many as were missing (a diverged
    one is FAIL, left for a rerun). When the rest run elsewhere it waits: should their worker die,
    it runs the retry."""
    study, attempts, waited_for = open_study(args), None, None
    while True:
        # a dead worker's trial: FAIL, and retry_stale queues it again
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = [t.number for t in trials if t.state == State.RUNNING]
        attempts = args.trials - finished if attempts is None else attempts
        bar.update(min(finished, args.trials) - bar.n)
        if finished >= args.trials or attempts == 0:
            return
        if finished + len(running) >= args.trials:
            if running != waited_for:
                tqdm.write(f"waiting for trial(s) {running}, running in other workers",
                           file=sys.stderr)
                waited_for = running
            time.sleep(args.heartbeat)
        else:
            # a diverged lr is a FAIL trial, the study goes on
            study.optimize(lambda t: objective(t, args), n_trials=1, catch=(runs.NonFiniteLoss,))
            attempts -= 1


def worker(args, k: int) -> None:
    """A --jobs process (spawned: no inherited CUDA or thread state). It trains on GPU k (round
    robin) when there are GPUs, else on an equal share of the CPU threads; flags after -- win."""
    given = train_cifar.parse_args(train_argv(args, args.out)).explicit
    if "device" not in given and torch.cuda.device_count():
        args.train_args += ["--device", f"cuda:{k % torch.cuda.device_count()}"]
    elif "threads" not in given:
        args.train_args += ["--threads", str(max(1, len(os.sched_getaffinity(0)) // args.jobs))]
    guarded(lambda: work(args, tqdm(disable=True)), args, f"sweep.py worker {k}")


def run_sweep(args) -> None:
    # with --jobs: created and checked once, before the workers start
    study, failed = open_study(args), []
    os.makedirs(args.out, exist_ok=True)
    if args.jobs == 1:
        with tqdm(total=args.trials, desc="trials") as bar:
            work(args, bar)
    else:  # N processes, each with its own log lines: one that crashes leaves the others running
        procs = [multiprocessing.get_context("spawn").Process(target=worker, args=(args, k))
                 for k in range(args.jobs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [f"worker {k}: status {p.exitcode}" for k, p in enumerate(procs) if p.exitcode]
    report_sweep(study, args)
    if failed:
        raise runs.UsageError(f"{', '.join(failed)}; rerun the same command to finish the study")


# ----------------------------------------------------------------------------- reports


def cell(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def table(path: str, head: list[str], rows: list[list], title: str = "") -> None:
    """Print a markdown table after `title`, write it to path (each worker its own temp file)."""
    text = title + "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                              *("| " + " | ".join(map(str, row)) + " |" for row in rows)])
    print(text)
    runs.atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def report_sweep(study: optuna.Study, args) -> None:
    """trials.md (printed; every trial once, whichever worker ran it), best.json, the plots."""
    trials, names = study.get_trials(deepcopy=False), [dest for dest, *_ in SPACE]
    rows = [[t.number, t.state.name, cell(t.value, ".4f"), cell(a.get("accuracy"), ".2f", 100),
             cell(a.get("c"), ".3f"), cell(a.get("val_executed_macs"), ".2f", 1e-6),
             *(cell(t.params.get(n), ".3g") for n in names), cell(a.get("wall_time_s"), ".1f"),
             a.get("worker", "-"), t.system_attrs.get("failed_trial", "-")]
            for t in trials for a in [t.user_attrs]]
    table(os.path.join(args.out, "trials.md"), ["trial", "state", "L", "val top-1 (%)", "c",
          "exec MACs (M)", *names, "wall (s)", "worker", "retry of"], rows)
    finished = [t for t in trials if t.state in FINISHED and "accuracy" in t.user_attrs]
    if len(finished) < args.trials and (n_fail := sum(t.state == State.FAIL for t in trials)):
        print(f"{n_fail} trial(s) failed; rerun the same command to replace them", file=sys.stderr)
    complete = [t for t in trials if t.state == State.COMPLETE]
    if complete:
        best = study.best_trial
        runs.write_json(os.path.join(args.out, "best.json"), {
            "trial": best.number, "objective_L": best.value, "lam": args.lam,
            "params": best.params, "metrics": best.user_attrs})
        print(f"best: trial {best.number} L={best.value:.4f} {best.params}")
    points = [(t.user_attrs["val_executed_macs"] / 1e6, 100 * t.user_attrs["accuracy"])
              for t in finished]
    static = finished[0].user_attrs["static_macs"] / 1e6 if finished else None
    plots.plot_pareto(os.path.join(args.out, "pareto.png"), points, [t.number for t in finished],
                      [t.state.name for t in finished], static)
    if len(complete) < 2:
        print(f"importances.png not written: Optuna needs 2 completed trials, not {len(complete)}",
              file=sys.stderr)
        return
    # e.g. "too few trials: importances will be equal"
    with warnings.catch_warnings(record=True, action="always") as caught:
        imp = optuna.importance.get_param_importances(study)
    if note := " ".join(str(w.message) for w in caught):
        print(f"importances.png: Optuna says: {note}", file=sys.stderr)
    plots.plot_importances(os.path.join(args.out, "importances.png"), imp, len(complete))


# ----------------------------------------------------------------------------- §5.3 ablation grid


def run_ablations(args) -> None:
    grid, rows = list(itertools.product(SELECTORS, POLICIES, MODES))[: args.limit], []
    for sel, policy, mode in tqdm(grid, desc="ablations"):
        out = os.path.join(args.out, f"{sel}-{policy}-{mode}")
        final = os.path.join(out, "final.json")
        if not os.path.exists(final):
            argv = train_argv(args, out, selector=sel, policy=policy, grow_prune=mode)
            if os.path.exists(os.path.join(out, "checkpoint.pt")):  # interrupted: continue it
                argv += ["--resume", out]
            try:
                train_cifar.main(train_cifar.parse_args(argv))
            except runs.NonFiniteLoss as e:
                print(f"{out}: {e}; left out of the table", file=sys.stderr)
        if os.path.exists(final):
            r = runs.read_json(final)
            rows.append([sel, policy, mode, f"{r['test_top1']:.2f}",
                         f"{r['test_executed_macs_per_sample'] / 1e6:.2f}",
                         f"{r['params'] / 1e6:.2f}", f"{r['wall_time_s']:.1f}"])
    table(os.path.join(args.out, "ablations.md"), ["selector", "routing", "grow/prune", "top-1 (%)",
          "expected executed MACs (M)", "params (M)", "wall time (s)"], rows,
          f"§5.3 ablations: {args.backbone}, {args.dataset}, {args.epochs} epochs; test top-1 and "
          "expected executed MACs per test sample\n\n")
    plots.plot_selector_curves(args.out, grid)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = runs.Parser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ablations", action="store_true", help="the §5.3 grid instead of the sweep")
    p.add_argument("--limit", type=runs.positive, help="ablations: only the first N of the 24")
    p.add_argument("--trials", type=runs.positive, default=50, help="finished trials (§6.2: 50)")
    # §6.2 gives no lambda; 0.1 trades 1 point of top-1 for 10% of the compute: Table 4's ~1 point
    # at 21-70% fewer FLOPs
    p.add_argument("--lam", type=float, default=0.1, help="lambda of L = (1 - acc) + lambda*c")
    p.add_argument("--epochs", type=runs.positive, default=40, help="per run (§5.3: 40 epochs)")
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--backbone", default="resnet101", choices=BACKBONES, help="§5.3 and §6.2")
    p.add_argument("--seed", type=int, default=0, help="TPE seed and every run's training seed")
    p.add_argument("--out", help="sweep/ablation directory (None: runs/sweep or runs/ablations)")
    p.add_argument("--pruner-startup-trials", type=int, default=5, help="trials before any pruning")
    # warm-up, §6.2: grow/prune delays learning, early stopping penalises it
    p.add_argument("--pruner-warmup-epochs", type=int,
                   help="no pruning before this epoch (None: half of --epochs)")
    p.add_argument("--storage", help="Optuna RDB storage URL that every worker shares, e.g. "
                   "postgresql://user:pw@host/db (None: sqlite:///DIR/study.db, one machine)")
    p.add_argument("--study-name", default="juliet", help="the study in --storage")
    p.add_argument("--jobs", type=runs.positive, default=1,
                   help="workers here: one per GPU, else CPU threads split")
    p.add_argument("--heartbeat", type=runs.positive, default=30, help="seconds between a "
                   "worker's Optuna heartbeats; a trial silent for 3 has lost its worker")
    g = p.add_argument_group("search space (§6.2)")
    for _, flag, typ, default, _, _, text in SPACE:
        g.add_argument(flag, type=typ, nargs=2, default=default, metavar=("LOW", "HIGH"), help=text)
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.train_args = argv[cut + 1:]  # after --: train_cifar's flags
    for dest, flag, _, _, log, (lowest, highest), _ in SPACE:
        lo, hi = getattr(args, flag[2:].replace("-", "_"))
        if lo > hi:
            p.error(f"{flag}: LOW {lo:g} is above HIGH {hi:g}")
        if log and lo <= 0:
            p.error(f"{flag}: a log-scale range needs LOW > 0, got {lo:g}")
        if lo < lowest or hi > highest:
            p.error(f"{flag}: {dest} must lie in [{lowest:g}, {highest:g}], got {lo:g} {hi:g}")
    if owned := sorted(OWNED & {a.split("=")[0] for a in args.train_args}):
        p.error(f"{', '.join(owned)}: set by sweep.py for every run; use sweep.py's own flags or "
                "ranges")
    args.out = args.out or os.path.join("runs", "ablations" if args.ablations else "sweep")
    if args.ablations and (args.jobs > 1 or args.storage):
        p.error("--jobs and --storage are for the sweep; the §5.3 grid runs one run at a time")
    args.storage = (args.storage
                    or f"sqlite:///{os.path.abspath(os.path.join(args.out, 'study.db'))}")
    try:  # parses the URL and imports its driver; connects to nothing
        sqlalchemy.create_engine(args.storage).dispose()
    except (sqlalchemy.exc.ArgumentError, ImportError) as e:
        p.error(f"--storage: {e}; give an RDB URL, e.g. sqlite:///path/study.db or "
                "postgresql://user:pw@host/db")
    if args.pruner_warmup_epochs is None:
        args.pruner_warmup_epochs = args.epochs // 2
    # bad pass-through flags: one line and exit 2, now
    train_cifar.parse_args(train_argv(args, args.out))
    return args


def guarded(run, args, prog: str = "sweep.py") -> None:
    """Run; bad input ends with one line and status 1, Ctrl-C with how to continue."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one tqdm bar over trials instead
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: knowingly
    try:
        run()
    except (runs.UsageError, sqlalchemy.exc.SQLAlchemyError) as e:  # or a storage that won't open
        runs.fail(str(e).splitlines()[0], prog)
    except KeyboardInterrupt:
        runs.fail(f"interrupted; the same command continues in {args.out}", prog)


def main(argv=None) -> None:
    args = parse_args(argv)
    guarded(lambda: run_ablations(args) if args.ablations else run_sweep(args), args)


if __name__ == "__main__":
    main()
