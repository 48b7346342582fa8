"""The run directory: what a training run writes, how it is resumed and loaded, and how it fails (paper §5.3
"Profiling outputs").

    runs/<name>/config.json          the run's flags, dataset sizes, torch version
    runs/<name>/model_profile.json   dataset, input size, params, FLOPs (paper convention), proxy flag, NVML status
    runs/<name>/epoch_<k>.json       one record per epoch (the log line's fields and many more)
    runs/<name>/checkpoint.pt        model, optimizer, scheduler, scaler, progress, args, RNG state, trie structure
    runs/<name>/final.json           test-set numbers
    runs/<name>/*.png                accuracy curves, node usage, the trie

A run directory is never overwritten: a new run into one that holds a checkpoint is refused. Checkpoints
are written atomically (write, then rename). `--resume DIR` rebuilds the trie from its structure first,
then loads the weights; `load_run(DIR)` does the same for measurement. Bad input is a `UsageError`: `cli`
prints it as one line on stderr and exits non-zero, before any file is made.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from backbones import make_backbone, static_model
from trie import JulietNet

# MKL, torch's CPU BLAS, picks kernels by memory alignment unless asked for reproducible results: the same step
# could differ in its last bits between two processes (or two runs in one), and --resume would not be exact.
# MKL reads this at its first call, so it holds unless something ran a matmul before this module was imported.
os.environ.setdefault("MKL_CBWR", "AUTO")


class UsageError(Exception):
    """Bad input: the CLI prints this one line and exits with status 1, touching nothing on disk."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: stop, keeping the last good checkpoint."""


# ----------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ranged(kind, ok, what: str):
    """An argparse type: a finite number of `kind` for which ok(v) holds, else one line saying what it must be."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    return parse


positive_float = _ranged(float, lambda v: v > 0, "a number > 0")
nonneg_float = _ranged(float, lambda v: v >= 0, "a number >= 0")
unit_interval = _ranged(float, lambda v: 0 <= v <= 1, "in [0, 1]")
open_unit = _ranged(float, lambda v: 0 < v < 1, "in (0, 1)")
positive = _ranged(int, lambda v: v >= 1, "a positive integer")
nonneg = _ranged(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _ranged(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--out", default=None, help="run directory (default: runs/<backbone>-<variant>-<time>)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint of --resume DIR on test")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (§5.3 software stack)")
    g.add_argument("--compile", action="store_true", help="torch.compile every stage (§5.3 software stack)")
    g.add_argument("--workers", type=nonneg, default=2, help="DataLoader workers")
    g.add_argument("--threads", type=nonneg, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on CUDA)")
    g.add_argument("--limit-batches", type=nonneg, default=0, help="stop each pass after N batches (smoke tests)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def finish_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, remember which flags were given explicitly (for --resume), and name a new run's directory."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # Explicit flags: parse again into a namespace pre-filled with a marker, which argparse's defaults leave alone
    # (robust to abbreviations and aliases such as --router).
    unset = object()
    given = vars(p.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in p._actions})))
    args.explicit = sorted(d for d, v in given.items() if v is not unset and d != "help")
    for a in p._actions:  # also flags declared with a plain `type=float`: finite, and loss weights >= 0
        v = getattr(args, a.dest, None)
        if isinstance(v, float) and not (math.isfinite(v) and (v >= 0 or not a.dest.endswith("_weight"))):
            p.error(f"argument {a.option_strings[0]}: must be a finite number{' >= 0' * (v < 0)}, got {v}")
    if args.eval_only and not args.resume:
        p.error("--eval-only needs --resume DIR (the run to evaluate)")
    if args.out is None and not args.resume:
        variant = "static" if args.static else "juliet"
        args.out = os.path.join("runs", f"{args.backbone}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def cli(main, parse_args) -> None:
    """Run main(); bad input and a diverged loss end with one line on stderr and a non-zero status."""
    args = parse_args()
    try:
        main(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except NonFiniteLoss as e:
        sys.exit(f"error: {e}; stopped, the last good checkpoint (if any) is in {args.resume or args.out}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; continue with: --resume {args.resume or args.out}")


# ----------------------------------------------------------------------------- opening a run


RUNTIME_FLAGS = ("epochs", "device", "workers", "threads", "amp", "compile", "quiet", "limit_batches", "data_dir",
                 "eval_only")


def open_run(args):
    """New run: refuse to touch an existing run. --resume/--eval-only: saved args + runtime overrides."""
    if not (args.resume or args.eval_only):
        if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
            raise UsageError(f"{args.out} already holds a run; continue it with --resume {args.out} "
                             "or pick another --out")
        return args, None
    path = os.path.join(args.resume or args.out, "checkpoint.pt")
    ckpt = load_checkpoint(path)
    merged = argparse.Namespace(**ckpt["args"])
    for k in RUNTIME_FLAGS:
        if k in args.explicit:
            setattr(merged, k, getattr(args, k))
    merged.out, merged.resume, merged.explicit = os.path.dirname(path), args.resume, args.explicit
    return merged, ckpt


def make_run_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write the run directory {out}: {e.strerror}") from None


def setup_device(args) -> None:
    """`--device auto` picks CUDA when there is one; TF32 on CUDA (Table 3); no autocast on CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.amp and not args.device.startswith("cuda"):
        tqdm.write("note: --amp is ignored on CPU (no autocast on CPU)")
        args.amp = False
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, loader) -> None:
    """Reseed everything from (seed, epoch): shuffling, augmentation, Gumbel noise and grown weights then
    do not depend on whether the process was restarted, which makes --resume exact."""
    s = seed * 100_003 + epoch
    seed_all(s)
    loader.generator.manual_seed(s)


# ----------------------------------------------------------------------------- files of a run


def write_json(path: str, obj) -> None:
    """Write then rename: a crash never leaves a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path: str, default=None):
    """A JSON file of a run; `default` when it does not exist."""
    if default is not None and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_checkpoint(out: str, model, state: dict, progress: dict, args) -> None:
    """Model, optimizer, scheduler, GradScaler, progress, args, RNG state and the trie structure, atomically."""
    ckpt = {"model": model.state_dict(), "structure": model.structure() if isinstance(model, JulietNet) else None,
            "optimizer": state["optimizer"].state_dict(), "scheduler": state["scheduler"].state_dict(),
            "scaler": state["scaler"].state_dict(), "run": progress, "args": vars(args),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    path = os.path.join(out, "checkpoint.pt")
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, device="cpu") -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    # Our own run's checkpoint: besides tensors it holds args and RNG state, which weights_only=True rejects.
    return torch.load(path, map_location=device, weights_only=False)


def model_from_checkpoint(ckpt: dict, backbone: str, num_classes: int):
    """The checkpoint's model: the trie rebuilt from its structure first (or the static backbone), then weights."""
    s = ckpt["structure"]
    if s is None:
        model = static_model(backbone, num_classes)
    else:
        model = JulietNet.from_structure(s, make_backbone(s["backbone"], s["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_run(run_dir: str, device="cpu"):
    """(config, model in eval mode) of a run directory, for measurement."""
    for name in ("", "config.json", "checkpoint.pt"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise UsageError(f"{run_dir} has no {name}" if name else f"{run_dir}: no such run directory")
    config = read_json(os.path.join(run_dir, "config.json"))
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), device)
    model = model_from_checkpoint(ckpt, config["backbone"], config["num_classes"])
    return config, model.to(device).eval()


def write_epoch(out: str, log: dict, quiet: bool) -> None:
    """One line per epoch with fixed key=value fields, and the full record as epoch_<k>.json."""
    write_json(os.path.join(out, f"epoch_{log['epoch']}.json"), log)
    fields = [f"epoch={log['epoch']}", f"train_loss={log['train_loss']:.4f}", f"train_top1={log['train_top1']:.2f}",
              f"val_loss={log['val_loss']:.4f}", f"val_top1={log['val_top1']:.2f}", f"lr={log['lr']:.2e}",
              f"paper_MMACs={log['flops_paper_convention_macs'] / 1e6:.2f}"]
    if "val_executed_macs_per_sample" in log:
        fields += [f"exec_MMACs={log['val_executed_macs_per_sample'] / 1e6:.2f}", f"nodes={log['n_nodes']}",
                   f"events={len(log['events'])}"]
    fields.append(f"time={log['time_epoch_s']:.1f}s")
    tqdm.write(" ".join(fields))


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(out: str, history: list, model, final: dict) -> None:
    """accuracy.png (Fig. 2 style curves); for Juliet also node_usage.png and trie.png (test traffic)."""
    plt = pyplot()
    if history:
        ep = [h["epoch"] for h in history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ep, [h["train_top1"] for h in history], "o-", label="train")
        ax.plot(ep, [h["val_top1"] for h in history], "s-", label="val")
        ax.set(xlabel="epoch", ylabel="top-1 (%)", title=os.path.basename(os.path.abspath(out)))
        ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(out, "accuracy.png"), dpi=120), plt.close(fig)
    if not isinstance(model, JulietNet):
        return
    visits, n = final["test_node_visits"], max(1, final["test_samples"])
    ids = [node.node_id for node in model.nodes()]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(ids) + 1))
    ax.barh(ids[::-1], [100 * visits.get(i, 0) / n for i in ids[::-1]])
    ax.set(xlabel="test samples entering the node (%)", title="node usage")
    fig.tight_layout(), fig.savefig(os.path.join(out, "node_usage.png"), dpi=120), plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(model.leaves())), 4))
    draw_trie(ax, model, {k: v / n for k, v in visits.items()})
    fig.tight_layout(), fig.savefig(os.path.join(out, "trie.png"), dpi=120), plt.close(fig)


def draw_trie(ax, model, share: dict) -> None:
    """Leaves left to right, parents centred over their children; size and colour show the traffic share."""
    pos, next_x = {}, iter(range(10**6))

    def place(node, level):
        xs = [place(k, level + 1) for k in node.choices]
        pos[node.node_id] = (sum(xs) / len(xs) if xs else next(next_x), -level)
        return pos[node.node_id][0]

    place(model.root, 0)
    for node in model.nodes():
        for k in node.choices:
            (x0, y0), (x1, y1) = pos[node.node_id], pos[k.node_id]
            ax.plot([x0, x1], [y0, y1], "-", color="0.6", lw=0.5 + 4 * share.get(k.node_id, 0), zorder=1)
    nodes = list(model.nodes())
    s = [share.get(n.node_id, 0) for n in nodes]
    ax.scatter([pos[n.node_id][0] for n in nodes], [pos[n.node_id][1] for n in nodes], s=[60 + 600 * v for v in s],
               c=s, cmap="viridis", vmin=0, vmax=1, marker="o", edgecolors="k", zorder=2)
    for n, v in zip(nodes, s):
        label = ("stop" if n.is_stop else n.node_id) + f"\n{100 * v:.0f}%"
        ax.annotate(label, pos[n.node_id], textcoords="offset points", xytext=(0, -22), ha="center", fontsize=7)
    ax.set_title("trie, share of test samples per node"), ax.axis("off")
