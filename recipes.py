"""Every setting of a Juliet run and its one default: the named recipes and the command line.

Juliet's own settings are the library's arguments: `JulietNet` (trie.py), `GrowPruneConfig`
(grow_prune.py), `juliet_loss` and `gumbel_tau` (losses.py). Their defaults are our recipe, so a
module copied alone trains as `train_cifar.py` with no flags; this file reads them from the
signatures (`LIBRARY`) rather than repeating them, and holds the rest:

  PROTOCOLS  the paper's two training setups, Table 2 (CIFAR-10) and Table 3 (ImageNet)
  RECIPES    "ours" (the library's defaults) and "paper" (every deviation of ours off)
  SCRIPT     the training script's own settings

The command line shows the settings a reader of the paper looks for, grouped under its names;
every other setting is a knob, `--set NAME=VALUE` (`--set help` lists them), which sweep.py uses
too. An explicit flag or knob always wins over the recipe:

    python train_cifar.py --recipe paper                   # the paper's recipe, Table 2's protocol
    python train_cifar.py --set train_depth=routed         # our recipe with one deviation off
"""

import argparse
import dataclasses
import inspect
import os
import sys
import time

import data
import runs
from backbones import BACKBONES
from grow_prune import MODES, STATISTICS, GrowPruneConfig
from losses import gumbel_tau, juliet_loss
from routers import SELECTORS, STOP_GO, STOP_RULES
from trie import POLICIES, TRAIN_DEPTHS, JulietNet


def defaults_of(fn, names=None) -> dict:
    """The default of each keyword argument of `fn` (of `names` only, if given)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and (names is None or p.name in names)}


NET = ("selector", "policy", "prebuild", "stop", "d_model", "n_head", "ema_beta", "train_depth",
       "exit_confidence", "stop_rule", "stop_go", "stage_grad")  # JulietNet's settings of a run
LIBRARY = {**defaults_of(JulietNet.__init__, NET), **dataclasses.asdict(GrowPruneConfig()),
           **defaults_of(juliet_loss), **defaults_of(gumbel_tau, ("tau0", "tau_min"))}  # ours
SCRIPT = dict(calibrate=True, stop_tolerance=0.5, keep="best", data_dir="./data", holdout=0,
              synthetic_size=10000, data_seed=0, val_seed=0, download=True, deterministic=False,
              limit_batches=0)  # the training script's own settings (calibrate.py: ours)
TABLE2 = dict(dataset="cifar10", backbone="resnet18", input_size=32, epochs=60, batch_size=128,
              optimizer="adam", lr=1e-3, wd=1e-5, momentum=0.9, scheduler="plateau", lr_factor=0.5,
              lr_patience=3, t_max=40, val_fraction=0.1, workers=2)  # and its 90/10 split;
# momentum and t_max act only under SGD and cosine (Table 3's); Table 2's grow/prune row
# (theta_grow 0.4, theta_prune 0.1, every 3 epochs) is GrowPruneConfig's default, off in ours
TABLE3 = TABLE2 | dict(dataset="imagenet", backbone="resnet101", input_size=224, epochs=120,
                       batch_size=256, workers=8, optimizer="sgd", lr=0.1, wd=1e-4,
                       scheduler="cosine", theta_grow=0.5, prune_every=5, prebuild=10,
                       grow_prune="both", holdout=50000)  # §6.3 tests on val: MSDNet's split
                                                          # of train/ validates
PROTOCOLS = {"cifar": TABLE2, "imagenet": TABLE3}
RECIPES = {
    "ours": {},
    "paper": dict(train_depth="routed", exit_confidence=False, stop_rule="argmax",
                  stop_go="selector", stage_grad=1.0, exit_weight=0.0, route_weight=0.0,
                  split_weight=0.0, grow_prune="both", grow_statistic="sigma2", usage_horizon=0.0,
                  prune_kept=False, calibrate=False, keep="last", holdout=0),
}


def defaults(protocol: str = "cifar", recipe: str = "ours") -> dict:
    """Every setting's default: the library's, the script's, the protocol's, then the recipe's."""
    return {**LIBRARY, **SCRIPT, **PROTOCOLS[protocol], **RECIPES[recipe]}


# ----------------------------------------------------------------------------- the command line


def boolean(s: str) -> bool:
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")


def optional(kind):
    """An argparse type that also takes "none" (a setting whose default is None)."""
    return lambda s: None if s.lower() == "none" else kind(s)


def main_options(p: argparse.ArgumentParser) -> None:
    """The flags of `--help`, under the paper's names."""
    g = p.add_argument_group("Table 2 (train_imagenet.py: Table 3)")
    g.add_argument("--backbone", choices=BACKBONES, help="§5.1")
    g.add_argument("--static", action="store_true", help="the unmodified backbone (Table 4)")
    g.add_argument("--dataset", choices=data.DATASETS, help="synthetic: the offline demo set")
    g.add_argument("--data-dir", help="CIFAR's root, or an image folder with train/ and test/")
    g.add_argument("--input-size", type=runs.positive, help="image side (CIFAR is resized to it)")
    g.add_argument("--epochs", type=runs.positive, help="Table 2: 15, 30 or 60; §6.3: 120")
    g.add_argument("--batch-size", type=runs.positive, help="Table 2: 128; Table 3: 256")
    g.add_argument("--lr", type=runs.positive_float, help="Table 2: Adam 1e-3; Table 3: SGD 0.1")
    g.add_argument("--wd", type=runs.nonneg_float, help="weight decay: Table 2 1e-5, Table 3 1e-4")
    g = p.add_argument_group("selectors and routing (§3.1.2, §4.1, §5.3)")
    g.add_argument("--selector", choices=list(SELECTORS), help="N.PS: §4.1's or §5.3's")
    g.add_argument("--policy", choices=POLICIES, help="§4.1's top-1 or §5.3's annealed Gumbel")
    g.add_argument("--prebuild", type=optional(runs.positive), help="nodes in the first chain "
                   "(§5.3: 5; 10 for ResNet-101); None: every stage")
    g.add_argument("--d-model", type=runs.positive, help="selector width (§4.1 gives none)")
    g.add_argument("--n-head", type=runs.positive, help="selector heads (§4.1 gives none)")
    g = p.add_argument_group("growth and pruning (§3.1.1, §4.2, §4.3: Alg. 2 and 3)")
    g.add_argument("--grow-prune", choices=MODES, help="§5.3's modes; ours: off (README)")
    g.add_argument("--theta-grow", type=runs.unit_interval, help="on our split share, or Alg. 2's "
                   "sigma^2 (--set grow_statistic=sigma2); Table 2: 0.4; Table 3: 0.5")
    g.add_argument("--theta-prune", type=runs.unit_interval, help="Tables 2 and 3: 0.1")
    g.add_argument("--grow-every", type=runs.positive, help="mini-batches (Table 3: 10)")
    g.add_argument("--prune-every", type=runs.positive, help="E_prune in epochs (Table 2: 3; 3: 5)")
    g.add_argument("--t-min", type=runs.positive, help="epochs of alpha < theta_prune (Alg. 3)")
    g.add_argument("--m-max", type=runs.positive, help="M_max stage branches per node (Alg. 2)")
    g.add_argument("--max-depth", type=optional(runs.nonneg), help="the deepest node; None: the "
                   "last stage (§6.2's best: 2)")
    g = p.add_argument_group("ours (README 'Paper notes and deviations')")
    g.add_argument("--recipe", default="ours", choices=RECIPES, help="named defaults: ours, or "
                   "the paper's (every deviation off); explicit flags and knobs win")
    g.add_argument("--set", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                   help="any other setting (a knob); `--set help` lists them")
    g.add_argument("--cost-weight", type=runs.nonneg_float, help="route_loss's lambda_c (§6.2)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, help="fit the stop "
                   "decisions and operating point on the validation split after training")
    g.add_argument("--stop-tolerance", type=runs.nonneg_float, help="operating point: the "
                   "validation points it may lose against full depth")
    g.add_argument("--keep", choices=("best", "last"), help="the epoch tested and kept in "
                   "model.pt: best validation top-1 (ties: the later), or the last")
    runs.add_run_args(p)


KNOBS = {  # name: (type, or the allowed values; meaning)
    "train_depth": (TRAIN_DEPTHS, "full: training samples run to a leaf (ours); routed"),
    "stage_grad": (runs.unit_interval, "share of the exits' and selectors' gradient that reaches "
                   "the stages (ours: 0; the paper: 1)"),
    "exit_confidence": (boolean, "stop logits read the exit's confidence (ours)"),
    "stop_rule": (tuple(STOP_RULES), "half: P_stop >= 1/2 stops (ours); argmax: Alg. 1"),
    "stop_go": (STOP_GO, "a stop-or-go node decides on its exit's confidence (ours), or by the "
                "selector"),
    "stop": (boolean, "every internal node has a stop branch (ours)"),
    "exit_weight": (runs.nonneg_float, "of losses.exit_loss (ours; the paper: 0)"),
    "route_weight": (runs.nonneg_float, "of losses.route_loss (ours; the paper: 0)"),
    "split_weight": (runs.nonneg_float, "of losses.split_loss (ours; the paper: 0)"),
    "balance_weight": (runs.nonneg_float, "of §2.2's losses.balance_loss"),
    "expected_cost_weight": (runs.nonneg_float, "of losses.expected_cost_loss"),
    "grow_statistic": (STATISTICS, "growth's trigger: split (ours) or §4.2's sigma2"),
    "usage_horizon": (runs.nonneg_float, "epochs over which alpha forgets (ours); 0: ema_beta"),
    "prune_kept": (boolean, "prune the kept trie on validation traffic (ours)"),
    "ema_beta": (runs.unit_interval, "EMA decay per step of sigma^2 and the split share"),
    "tau0": (runs.positive_float, "gumbel: initial temperature (§3.1.3)"),
    "tau_min": (runs.positive_float, "gumbel: final temperature"),
    "optimizer": (("adam", "sgd"), "Table 2: Adam; Table 3: SGD"),
    "momentum": (runs.unit_interval, "SGD's (Table 3: 0.9)"),
    "scheduler": (("plateau", "cosine"), "Table 2: ReduceLROnPlateau; Table 3: cosine"),
    "lr_factor": (runs.open_unit, "plateau's factor (Table 2: 0.5)"),
    "lr_patience": (runs.nonneg, "plateau's patience (Table 2: 3)"),
    "t_max": (runs.positive, "cosine's T_max (Table 3: 40)"),
    "val_fraction": (runs.open_unit, "the training set's validation share (Table 2: 0.1)"),
    "holdout": (runs.nonneg, "ImageNet's validation images, held out of train/ (MSDNet: 50,000; "
                "0: §6.3's, validating on the test set)"),
    "val_seed": (runs.seed_int, "seed of the train/validation split"),
    "synthetic_size": (runs.positive, "synthetic train + validation images"),
    "data_seed": (runs.seed_int, "seed of the synthetic images"),
    "download": (boolean, "fetch CIFAR when absent"),
    "deterministic": (boolean, "deterministic kernels (slower on CUDA)"),
    "limit_batches": (runs.nonneg, "stop each pass after N batches (smoke tests)"),
}


def knob(name: str, value: str):
    """A `--set` value, parsed and checked as its knob's type."""
    kind = KNOBS[name][0]
    if isinstance(kind, tuple):
        if value not in kind:
            raise argparse.ArgumentTypeError(f"choose one of: {', '.join(kind)}")
        return value
    return kind(value)


def build_parser(description: str, protocol: str = "cifar", recipe: str = "ours"):
    p = runs.Parser(description=description, epilog="knobs: --set help",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    main_options(p)
    p.set_defaults(**defaults(protocol, recipe))  # knobs too: every setting is in the namespace
    return p


def parse_args(argv=None, description="", protocol="cifar") -> argparse.Namespace:
    """The run's settings: the recipe's defaults under the protocol, the flags, then the knobs of
    `--set`. `explicit` names the settings the user gave (a resumed run refuses to change them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = build_parser(description, protocol).parse_known_args(argv)[0].recipe
    p = build_parser(description, protocol, recipe)
    args = p.parse_args(argv)
    given = set()
    for item in args.set:
        if item == "help":
            rows = [f"  {n:<22} {getattr(args, n)!s:<9} {text}" for n, (_, text) in KNOBS.items()]
            print("--set NAME=VALUE takes (name, default, meaning):\n" + "\n".join(rows))
            sys.exit(0)
        name, eq, value = item.partition("=")
        if not eq or name not in KNOBS:
            p.error(f"--set {item}: expected NAME=VALUE, NAME one of: {', '.join(KNOBS)}")
        try:
            setattr(args, name, knob(name, value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            p.error(f"--set {name}: {e}")
        given.add(name)
    unset = object()  # parsed again over markers: the flags given, robust to abbreviations
    dests = {a.dest for a in p._actions} - {"help", "set"}
    marked = vars(p.parse_args(argv, argparse.Namespace(**{d: unset for d in dests})))
    args.explicit = sorted({d for d in dests if marked[d] is not unset} | given)
    return finish(p, args)


def finish(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.eval_only and not args.resume:
        p.error("--eval-only needs --resume DIR (the run to evaluate)")
    if args.out is None and not args.resume:
        variant = "static" if args.static else "juliet"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", f"{args.backbone}-{variant}-{stamp}")
    return args


def library_args(args, fn, names=None) -> dict:
    """The settings of `args` that `fn` takes with a default (or `names`), by name."""
    return {k: getattr(args, k) for k in names or defaults_of(fn)}
