"""sweep.py: the §6.2 cost-aware Optuna search and the §5.3 ablation grid, each run a normal train_cifar run.

    python sweep.py --trials 50 --epochs 40 --out runs/sweep                    # §6.2: 50 trials, CIFAR-10
    python sweep.py --trials 8 --epochs 2 --dataset synthetic --backbone resnet18 --out runs/sweep-demo
    python sweep.py --trials 60 ... (same flags)                                # continues the study: 10 more
    python sweep.py --ablations --epochs 40 --out runs/ablations [--limit N]    # §5.3, Fig. 3
    python sweep.py ... -- --synthetic-size 2000 --workers 0                     # anything after -- goes to train_cifar

Sweep (§6.2). Optuna minimises the paper's single weighted objective L = (1 - accuracy) + lambda * c, with
accuracy the validation top-1 (a fraction) and c = expected executed MACs per validation sample / the static
backbone's MACs. c uses the honest executed cost of the routed samples (README "Results"), not the paper-convention
THOP number, which follows one dummy input down one path. Optuna cannot prune multi-objective studies, so the
objective stays scalar and accuracy, c, MACs, params, wall time and the run directory are trial user
attributes. A trial's value is L at its last epoch (the model the run keeps). --lam defaults to 0.1 (§6.2 gives
no value): 1 point of top-1 weighs as much as 10% of the static compute. TPE sampler (seeded); L goes to a
MedianPruner every epoch (from half of --epochs on, never at the last). Trial k trains in DIR/trial_k;
the study lives in DIR/study.db, so the same command with a larger --trials runs only the missing finished
(complete or pruned) trials. Writes best.json, trials.md, pareto.png, importances.png.

Stale trials: one sweep per DIR at a time (an flock on DIR/sweep.lock, released by the kernel when the process
dies), so a trial still RUNNING when the lock is taken was left by a killed process: it is marked FAIL, never
counted, and its number and directory are not reused.

Ablations (§5.3): selector {transformer, mlp, conv} x routing {top1, gumbel} x grow/prune {both, grow-only,
prune-only, off}, in DIR/<selector>-<policy>-<mode>; finished runs (final.json) are skipped, interrupted ones
resumed. Writes ablations.md (also printed) and selector_curves.png (Fig. 3: val top-1 per epoch by selector).
"""

import argparse
import fcntl
import itertools
import json
import os
import shlex
import sys
import time
import warnings
from functools import lru_cache

import optuna
from tqdm import tqdm

import data
import measure
import runs
import train_cifar
from backbones import BACKBONES, static_model
from grow_prune import MODES
from routers import SELECTORS
from trie import POLICIES

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

# §6.2: "maximum depth, grow threshold, pruning interval, pruning threshold, learning rate, and weight decay".
# (train_cifar dest, sweep flag, type, default range, log scale, allowed interval, help). The paper's best
# trial (depth 2, theta_grow ~0.91, E_prune 2, theta_prune ~0.65) lies inside every default range.
SPACE = (("max_depth", "--depth-range", int, (1, 4), False, (0, 100), "deepest node of growth (Alg. 2); §6.2 best: 2"),
         ("grow_threshold", "--grow-range", float, (0.1, 0.95), False, (0.0, 1.0),
          "theta_grow (Table 2: 0.4; §6.2 best: ~0.91)"),
         ("prune_every", "--prune-every-range", int, (1, 5), False, (1, 10**6),
          "E_prune, epochs (Table 2: 3; §6.2 best: 2)"),
         ("prune_threshold", "--prune-range", float, (0.01, 0.7), False, (0.0, 1.0),
          "theta_prune (Table 2: 0.1; §6.2 best: ~0.65)"),
         ("lr", "--lr-range", float, (1e-4, 3e-3), True, (0.0, float("inf")), "Adam lr, log scale (Table 2: 1e-3)"),
         ("wd", "--wd-range", float, (1e-6, 1e-3), True, (0.0, float("inf")),
          "weight decay, log scale (Table 2: 1e-5)"))
OWNED = {"--out", "--resume", "--eval-only", "--epochs", "--dataset", "--backbone", "--seed", "--selector", "--router",
         "--policy", "--grow-prune", *(f"--{dest.replace('_', '-')}" for dest, *_ in SPACE)}


def train_argv(args, out: str, **flags) -> list[str]:
    """train_cifar's command line for one run: sweep.py's own flags, the per-run ones, then the pass-through."""
    argv = ["--dataset", args.dataset, "--backbone", args.backbone, "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--quiet", "--out", out]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + args.train_args


# ----------------------------------------------------------------------------- the §6.2 objective


@lru_cache
def _static_macs(backbone: str, num_classes: int, input_size: int) -> float:
    return measure.paper_macs(static_model(backbone, num_classes), input_size)[0]


def static_macs(run_dir: str) -> float:
    """The normaliser of c: the static backbone's MACs per sample (it executes everything, so THOP on one
    dummy input is exact for it), for the backbone, classes and input size that the run recorded."""
    config = runs.read_json(os.path.join(run_dir, "config.json"))
    return _static_macs(config["backbone"], config["num_classes"], config["input_size"])


def reporter(trial, lam: float, epochs: int, run_dir: str):
    """train_cifar's on_epoch hook: L of this epoch to the pruner, metrics to the trial; returns (hook, last)."""
    t0, last = time.perf_counter(), {}

    def on_epoch(log: dict) -> None:
        acc = log["val_top1"] / 100
        macs = log.get("val_executed_macs_per_sample", log["flops_paper_convention_macs"])  # --static: all of it
        base = static_macs(run_dir)
        last.update(L=(1 - acc) + lam * macs / base, accuracy=acc, c=macs / base, val_executed_macs=macs,
                    static_macs=base, params=log["params"], epochs_run=log["epoch"],
                    wall_time_s=time.perf_counter() - t0, run_dir=run_dir)
        for k, v in last.items():
            trial.set_user_attr(k, v)
        trial.report(last["L"], log["epoch"])
        # A finished run costs only its test pass now: never prune at the last epoch.
        if log["epoch"] < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"epoch {log['epoch']}: L={last['L']:.4f} is worse than the median")

    return on_epoch, last


def objective(trial, args) -> float:
    params = {}
    for dest, flag, typ, _, log, *_ in SPACE:
        lo, hi = getattr(args, flag[2:].replace("-", "_"))
        params[dest] = trial.suggest_int(dest, lo, hi) if typ is int else trial.suggest_float(dest, lo, hi, log=log)
    run_dir = os.path.join(args.out, f"trial_{trial.number}")
    on_epoch, last = reporter(trial, args.lam, args.epochs, run_dir)
    final = train_cifar.main(train_cifar.parse_args(train_argv(args, run_dir, **params)), on_epoch=on_epoch)
    for k in ("test_top1", "test_executed_macs_per_sample", "flops_paper_convention_macs", "wall_time_s"):
        trial.set_user_attr(k, final[k])
    return last["L"]  # the final epoch's objective: the model the run keeps


def open_study(args) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(os.path.join(args.out, 'study.db'))}")
    study = optuna.create_study(storage=storage, study_name="juliet", direction="minimize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                                                   n_warmup_steps=args.pruner_warmup_epochs))
    run_only = ("trials", "ablations", "limit", "out", "pruner_startup_trials", "pruner_warmup_epochs")
    settings = {k: v for k, v in vars(args).items() if k not in run_only}
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    elif saved != settings:  # L and the trials would not be comparable
        diff = ", ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v)
        raise runs.UsageError(f"{args.out} holds a study made with other settings ({diff}); "
                                     f"rerun with the same flags or pick another --out")
    # A fixed seed on every invocation would replay the first trials' random start-up draws on resume.
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
    return study


def fail_stale(study: optuna.Study) -> None:
    """Under our lock nothing else runs trials, so a RUNNING one was left by a killed sweep."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        print(f"marked trial(s) {[t.number for t in stale]}, left RUNNING by a killed sweep, as FAIL", file=sys.stderr)


def run_sweep(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise runs.UsageError(f"another sweep.py is running in {args.out}; wait for it "
                                         "or pick another --out") from None
        study = open_study(args)
        fail_stale(study)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        bar = tqdm(total=args.trials, initial=min(done, args.trials), desc="trials")
        tick = lambda s, t: bar.update(t.state in FINISHED)  # an Optuna callback, after every trial
        if args.trials > done:
            study.optimize(lambda t: objective(t, args), n_trials=args.trials - done, callbacks=[tick],
                           catch=(runs.NonFiniteLoss,))  # a diverged lr is a FAIL trial, the study goes on
        bar.close()
        report_sweep(study, args)


# ----------------------------------------------------------------------------- sweep reports


def cell(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def report_sweep(study: optuna.Study, args) -> None:
    """trials.md (printed), best.json, pareto.png, importances.png."""
    trials = study.get_trials(deepcopy=False)
    names = [dest for dest, *_ in SPACE]
    lines = ["| trial | state | L | val top-1 (%) | c | exec MACs (M) | " + " | ".join(names) + " | wall (s) |",
             "|" + "---|" * (len(names) + 7)]
    for t in trials:
        a, p = t.user_attrs, t.params
        lines.append(f"| {t.number} | {t.state.name} | {cell(t.value, '.4f')} | {cell(a.get('accuracy'), '.2f', 100)} "
                     f"| {cell(a.get('c'), '.3f')} | {cell(a.get('val_executed_macs'), '.2f', 1e-6)} | "
                     + " | ".join(cell(p.get(n), ".3g") for n in names)
                     + f" | {cell(a.get('wall_time_s'), '.1f')} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "trials.md"), "w") as f:
        f.write(table + "\n")
    finished = [t for t in trials if t.state in FINISHED and "accuracy" in t.user_attrs]
    n_fail = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
    if len(finished) < args.trials and n_fail:
        print(f"{n_fail} trial(s) failed; rerun the same command to replace them", file=sys.stderr)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        runs.write_json(os.path.join(args.out, "best.json"),
                               {"trial": best.number, "objective_L": best.value, "lam": args.lam,
                                "params": best.params, "metrics": best.user_attrs})
        print(f"best: trial {best.number} L={best.value:.4f} {best.params}")
    plot_pareto(finished, os.path.join(args.out, "pareto.png"))
    plot_importances(study, len(complete), os.path.join(args.out, "importances.png"))


def pareto_front(points: list) -> list:
    """Indices of the (MACs, accuracy) points that no other point beats on both: fewer MACs, higher accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(trials: list, path: str) -> None:
    plt = runs.pyplot()
    pts = [(t.user_attrs["val_executed_macs"] / 1e6, 100 * t.user_attrs["accuracy"]) for t in trials]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        xy = [p for p, t in zip(pts, trials) if t.state.name == state]
        ax.scatter([x for x, _ in xy], [y for _, y in xy], marker=marker, c="0.55", label=state.lower())
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", c="C3", label="Pareto front")
    for i in front:
        ax.annotate(str(trials[i].number), pts[i], textcoords="offset points", xytext=(4, 4), fontsize=7)
    if trials:
        ax.axvline(trials[0].user_attrs["static_macs"] / 1e6, ls="--", c="0.3", lw=0.8, label="static backbone")
    ax.set(xlabel="expected executed MACs per sample (M, val)", ylabel="val top-1 (%)",
           title=f"§6.2 sweep: {len(trials)} finished trials")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


def plot_importances(study: optuna.Study, n_complete: int, path: str) -> None:
    if n_complete < 2:
        print(f"importances.png not written: Optuna needs 2 completed trials, the study has {n_complete}",
              file=sys.stderr)
        return
    with warnings.catch_warnings(record=True) as caught:  # e.g. "too few trials: importances will be equal"
        warnings.simplefilter("always")
        imp = optuna.importance.get_param_importances(study)
    note = " ".join(str(w.message) for w in caught)
    if note:
        print(f"importances.png: Optuna says: {note}", file=sys.stderr)
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh(list(imp)[::-1], list(imp.values())[::-1])
    ax.set(xlabel="importance for L (PED-ANOVA, Optuna default)", title=f"{n_complete} completed trials")
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


# ----------------------------------------------------------------------------- §5.3 ablation grid


def run_ablations(args) -> None:
    grid = list(itertools.product(SELECTORS, POLICIES, MODES))[: args.limit]
    for sel, policy, mode in tqdm(grid, desc="ablations"):
        out = os.path.join(args.out, f"{sel}-{policy}-{mode}")
        if os.path.exists(os.path.join(out, "final.json")):
            continue
        argv = train_argv(args, out, selector=sel, policy=policy, grow_prune=mode)
        if os.path.exists(os.path.join(out, "checkpoint.pt")):  # interrupted: continue it
            argv += ["--resume", out]
        try:
            train_cifar.main(train_cifar.parse_args(argv))
        except runs.NonFiniteLoss as e:
            print(f"{out}: {e}; left out of the table", file=sys.stderr)
    rows = ["| selector | routing | grow/prune | top-1 (%) | expected executed MACs (M) | params (M) | wall time (s) |",
            "|---|---|---|---|---|---|---|"]
    for sel, policy, mode in grid:
        path = os.path.join(args.out, f"{sel}-{policy}-{mode}", "final.json")
        if os.path.exists(path):
            r = runs.read_json(path)
            rows.append(f"| {sel} | {policy} | {mode} | {r['test_top1']:.2f} | "
                        f"{r['test_executed_macs_per_sample'] / 1e6:.2f} | {r['params'] / 1e6:.2f} | "
                        f"{r['wall_time_s']:.1f} |")
    table = (f"§5.3 ablations: {args.backbone}, {args.dataset}, {args.epochs} epochs; test top-1 and expected "
             "executed MACs per test sample\n\n" + "\n".join(rows))
    print(table)
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(table + "\n")
    plot_selector_curves(args.out, grid)


def selector_curve(out: str, grid: list, sel: str):
    """Fig. 3's line for one selector, {epoch: val top-1}, and its label: the selector's top1/both run (the
    paper's default setting) when it ran, else the per-epoch mean of its runs; None when none ran."""
    curves = {}
    for s, policy, mode in grid:
        d = os.path.join(out, f"{s}-{policy}-{mode}")
        logs = [runs.read_json(os.path.join(d, n)) for n in (os.listdir(d) if s == sel and os.path.isdir(d) else [])
                if n.startswith("epoch_") and n.endswith(".json")]
        if logs:
            curves[policy, mode] = {log["epoch"]: log["val_top1"] for log in logs}
    if ("top1", "both") in curves:
        return curves["top1", "both"], f"{sel} (top1, both)"
    if not curves:
        return None
    epochs = sorted(set().union(*curves.values()))
    return ({e: sum(c[e] for c in curves.values() if e in c) / sum(e in c for c in curves.values()) for e in epochs},
            f"{sel} (mean of {len(curves)} runs)")


def plot_selector_curves(out: str, grid: list) -> None:
    plt = runs.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for sel in SELECTORS:
        if (line := selector_curve(out, grid, sel)) is not None:
            curve, label = line
            ax.plot(sorted(curve), [curve[e] for e in sorted(curve)], "o-", label=label)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="selector architectures (Fig. 3)")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(os.path.join(out, "selector_curves.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = runs.Parser(prog="sweep.py", description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ablations", action="store_true", help="run the §5.3 ablation grid instead of the sweep")
    p.add_argument("--limit", type=runs.positive, default=None, help="ablations: only the first N of the 24")
    p.add_argument("--trials", type=runs.positive, default=50, help="finished trials in the study (§6.2: 50)")
    p.add_argument("--lam", type=float, default=0.1,
                   help="lambda of L = (1 - acc) + lambda*c (§6.2 gives no value; 0.1 trades 1 point of top-1 "
                        "for 10%% of the static compute, the paper's headline trade: within ~1 point at 21-70%% "
                        "fewer FLOPs, Table 4)")
    p.add_argument("--epochs", type=runs.positive, default=40, help="per run (§5.3: 40 epochs)")
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--backbone", default="resnet101", choices=BACKBONES, help="§5.3 and §6.2: ResNet-Juliet-101")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed and every run's training seed")
    p.add_argument("--out", default=None, help="sweep/ablation directory (default: runs/sweep or runs/ablations)")
    p.add_argument("--pruner-startup-trials", type=int, default=5, help="MedianPruner: trials before pruning")
    p.add_argument("--pruner-warmup-epochs", type=int, default=None,
                   help="MedianPruner: no pruning before this epoch (default: half of --epochs; §6.2: grow/prune "
                        "events delay early learning and early stopping penalises Juliet)")
    p.add_argument("--train-args", default="", help='more train_cifar flags as one string, e.g. "--workers 0"')
    g = p.add_argument_group("search space (§6.2)")
    for _, flag, typ, default, _, _, text in SPACE:
        g.add_argument(flag, type=typ, nargs=2, default=default, metavar=("LOW", "HIGH"), help=text)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = build_parser()
    args = p.parse_args(argv[:cut])
    args.train_args = shlex.split(args.train_args) + argv[cut + 1:]
    for dest, flag, _, _, log, (lowest, highest), _ in SPACE:
        lo, hi = getattr(args, flag[2:].replace("-", "_"))
        if lo > hi:
            p.error(f"{flag}: LOW {lo:g} is above HIGH {hi:g}")
        if log and lo <= 0:
            p.error(f"{flag}: a log-scale range needs LOW > 0, got {lo:g}")
        if lo < lowest or hi > highest:
            p.error(f"{flag}: {dest} must lie in [{lowest:g}, {highest:g}], got {lo:g} {hi:g}")
    owned = sorted(OWNED & {a.split("=")[0] for a in args.train_args})
    if owned:
        p.error(f"{', '.join(owned)}: set by sweep.py for every run; use sweep.py's own flags or ranges")
    args.out = args.out or os.path.join("runs", "ablations" if args.ablations else "sweep")
    if args.pruner_warmup_epochs is None:
        args.pruner_warmup_epochs = args.epochs // 2
    train_cifar.parse_args(train_argv(args, args.out))  # bad pass-through flags: one line and exit 2, now
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one tqdm bar over trials instead
    try:
        run_ablations(args) if args.ablations else run_sweep(args)
    except runs.UsageError as e:
        sys.exit(f"sweep.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the same command continues in {args.out}")


if __name__ == "__main__":
    main()
