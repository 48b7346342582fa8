"""The run directory: what a training run writes, how it is resumed and loaded, and how it fails
(paper §5.3 "Profiling outputs").

    runs/<name>/config.json          the run's flags, dataset sizes, torch version
    runs/<name>/model_profile.json   dataset, input size, params, paper FLOPs, proxy flag, NVML
    runs/<name>/epoch_<k>.json       one record per epoch (the log line's fields and many more)
    runs/<name>/checkpoint.pt        model, optimizer, scheduler, scaler, progress, args, RNG, trie
    runs/<name>/final.json           test-set numbers
    runs/<name>/*.png                accuracy curves, node usage, the trie, routing (plots.py)
    runs/<name>/eval_<k>/            `--eval-only` results (final.json, plots), never over the above

Nothing is lost: a new run needs a new or empty directory, one process at a time writes a run
directory (it holds DIR/.lock), files are written atomically (write, then rename). Nothing read can
run code: checkpoints hold tensors and plain containers and load with `weights_only=True`
(`load_checkpoint`; checkpoints.py writes them and rebuilds their models); JSON is checked when
read. Bad input is a `UsageError`: `cli` ends with it as one line on stderr (`fail`) and exit 1,
before any work or file."""

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from backbones import BACKBONES

# MKL, torch's CPU BLAS, picks kernels by memory alignment unless asked for reproducible results:
# the same step could differ in its last bits between two processes (or runs), and --resume would
# not be exact. MKL reads this at its first call: it holds unless a matmul ran before this import.
os.environ.setdefault("MKL_CBWR", "AUTO")


class UsageError(Exception):
    """Bad input: the CLI prints this one line and exits with status 1, touching nothing on disk."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: stop, keeping the last good checkpoint."""


# ----------------------------------------------------------------------------- command line


def error_line(message: str, prog: str | None = None) -> str:
    """`PROG: error: MESSAGE`, the one shape of every error a command here prints."""
    return f"{prog or os.path.basename(sys.argv[0])}: error: {message}"


def fail(message: str, prog: str | None = None, code: int = 1):
    """The one way a command ends on bad input: one line on stderr, then exit `code` (2: a flag, as
    argparse does; 1: what the flags point at). Printed here, so in-process callers see it too."""
    print(error_line(message, prog), file=sys.stderr, flush=True)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        fail(message, self.prog, 2)


def _ranged(kind, ok, what: str):
    """An argparse type: a finite `kind` with ok(v), else one line saying what it must be."""
    def parse(s: str):
        with contextlib.suppress(ValueError):
            if math.isfinite(v := kind(s)) and ok(v):
                return v
        raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
    return parse


positive_float = _ranged(float, lambda v: v > 0, "a number > 0")
nonneg_float = _ranged(float, lambda v: v >= 0, "a number >= 0")
unit_interval = _ranged(float, lambda v: 0 <= v <= 1, "in [0, 1]")
open_unit = _ranged(float, lambda v: 0 < v < 1, "in (0, 1)")
positive = _ranged(int, lambda v: v >= 1, "a positive integer")
nonneg = _ranged(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _ranged(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the run")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--out", help="new or empty run dir; None: runs/<backbone>-<variant>-<time>")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    g.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint of "
                   "--resume DIR on test; results go to DIR/eval_<k>/")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (§5.3)")
    g.add_argument("--compile", action="store_true", help="torch.compile every stage (§5.3)")
    g.add_argument("--workers", type=nonneg, help="DataLoader workers (Table 3: 8)")
    g.add_argument("--threads", type=nonneg, default=0, help="torch CPU threads (0: torch's)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def cli(main, parse_args) -> None:
    """Run main(); bad input and a diverged loss end with one line on stderr and exit status 1."""
    args = parse_args()
    try:
        return main(args)
    except UsageError as e:
        message = str(e)
    except NonFiniteLoss as e:
        message = f"{e}; stopped, the last good checkpoint (if any) is in {args.resume or args.out}"
    except KeyboardInterrupt:
        message = f"interrupted; continue with: --resume {args.resume or args.out}"
    fail(message)


# ----------------------------------------------------------------------------- opening a run


RUNTIME_FLAGS = ("epochs", "device", "workers", "threads", "amp", "compile", "quiet",
                 "limit_batches", "data_dir", "download", "eval_only")
LOCK = ".lock"


def open_run(args):
    """Check the run directory before any work. New run: --out must be new or empty.
    --resume/--eval-only: DIR's checkpoint (safe loader) and its settings, with the runtime flags
    given now; a flag that would change the run itself (backbone, data, lr, ...) is refused."""
    if not (args.resume or args.eval_only):
        check_unused(args.out)
        return args, None
    run_dir = args.resume
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(run_dir):
        raise UsageError(f"--out {args.out} and --resume {run_dir} differ; a resumed run stays in "
                         "its directory")
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir}: no such run directory")
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), need=CHECKPOINT_KEYS)
    read_json(os.path.join(run_dir, "config.json"), default={})  # damaged: refuse, not carry on
    saved = ckpt["args"]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved.get(k)})"
               for k in args.explicit
               if k not in (*RUNTIME_FLAGS, "resume", "out") and getattr(args, k) != saved.get(k)]
    if changed:
        raise UsageError(f"--resume continues {run_dir} with its own settings; these flags would "
                         f"change them: {', '.join(changed)}; drop them, or start a new run "
                         "with --out")
    # flags newer than the run keep today's defaults; the runtime flags given now win, and join
    # the run's record of what its user chose
    now = {k: getattr(args, k) for k in RUNTIME_FLAGS if k in args.explicit}
    merged = argparse.Namespace(**{**vars(args), **saved, **now, "out": run_dir, "resume": run_dir})
    merged.explicit = sorted(set(saved.get("explicit", [])) | set(now))
    return merged, ckpt


def _flock(lock, out: str) -> None:
    """The exclusive flock on out/.lock (open as `lock`), or one line: another process has it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another process is writing {out}; wait for it to end or "
                         "pick another --out") from None


def check_unused(out: str) -> None:
    """A new run's directory: new or empty (a leftover lock file is no run), and creatable."""
    if os.path.isdir(out):
        if held := sorted(set(os.listdir(out)) - {LOCK}):
            if LOCK in os.listdir(out):  # a run being written now: say so, not "move files away"
                with open(os.path.join(out, LOCK), "a") as lock:
                    _flock(lock, out)
            hint = (f"a run: continue it with --resume {out}" if "checkpoint.pt" in held
                    else "files: move them away")
            raise UsageError(f"{out} already holds {', '.join(held[:3])}{' ...' * (len(held) > 3)}"
                             f"; it is {hint}, or pick another --out (a new run needs a new or "
                             "empty directory)")
        return
    parent = out
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(parent) else "is not writable"
        raise UsageError(f"cannot write the run directory {out}: {parent} {why}")


@contextlib.contextmanager
def claim_run_dir(out: str, ckpt=None, new=True):
    """Hold `out`: an exclusive flock on out/.lock that the kernel drops however the process ends.
    Under it a new run finds `out` still unused, a resumed one (ckpt) its checkpoint as loaded."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, LOCK), "a")  # "a": never truncates what another process holds
    except OSError as e:
        raise UsageError(f"cannot write the run directory {out}: {e.strerror}") from None
    with lock:
        _flock(lock, out)
        if new and ckpt is None:
            check_unused(out)
        elif ckpt is not None and file_signature(ckpt["loaded_from"][0]) != ckpt["loaded_from"][1]:
            raise UsageError(f"{ckpt['loaded_from'][0]} changed while this process started; "
                             "run the command again")
        yield


def new_eval_dir(run_dir: str) -> str:
    """run_dir/eval_<k>, the first k free: --eval-only results never replace a run's own files."""
    k = 1
    while os.path.exists(os.path.join(run_dir, f"eval_{k}")):
        k += 1
    os.mkdir(path := os.path.join(run_dir, f"eval_{k}"))  # under the run's lock: k stays free
    return path


def setup_device(args) -> None:
    """`--device auto` picks CUDA when there is one; TF32 on CUDA (Table 3); no autocast on CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.deterministic
    elif args.amp:
        tqdm.write("note: --amp is ignored on CPU (no autocast on CPU)")
        args.amp = False
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, loader) -> None:
    """Reseed everything from (seed, epoch): shuffling, augmentation, Gumbel noise and grown weights
    then do not depend on whether the process was restarted, which makes --resume exact."""
    s = seed * 100_003 + epoch
    seed_all(s)
    loader.generator.manual_seed(s)


# ----------------------------------------------------------------------------- files of a run


def atomic_write(path: str, write) -> None:
    """write(f) to this process's temporary file, fsync, rename: crashes leave whole files."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path: str, default=None, need=()) -> dict:
    """A JSON object of a run (`default` when the file does not exist), checked: one line naming the
    file when it is not JSON, not an object, or lacks a key of `need`."""
    if default is not None and not os.path.exists(path):
        return default
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UsageError(f"{path} is damaged, not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a JSON {type(obj).__name__}, not the object a run writes")
    if missing := [k for k in need if k not in obj]:
        raise UsageError(f"{path} lacks {', '.join(missing)}")
    return obj


def read_config(run_dir: str) -> dict:
    """A run's config.json, with the fields that rebuild its model and data checked."""
    path = os.path.join(run_dir, "config.json")
    config = read_json(path, need=("backbone", "num_classes", "dataset", "input_size"))
    bad = [k for k in ("num_classes", "input_size") if type(config[k]) is not int or config[k] < 1]
    bad += (["backbone"] * (config["backbone"] not in BACKBONES)
            + ["dataset"] * (type(config["dataset"]) is not str))
    if bad:
        raise UsageError(f"{path}: {bad[0]} is {config[bad[0]]!r}, which no run writes")
    return config


CHECKPOINT_KEYS = ("model", "structure", "optimizer", "scheduler", "scaler", "run", "args", "rng")


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (no numpy arrays): safe to load."""
    version, keys, gauss = random.getstate()
    _, mt, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
            "numpy": [torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys.tolist()), gauss))
    np.random.set_state(("MT19937", s["numpy"][0].numpy().astype(np.uint32), *s["numpy"][1:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Meter:
    """Sums of loss and top-1/top-5 hits over an epoch."""

    def __init__(self):
        self.loss = self.top1 = self.top5 = self.n = self.batches = 0
        self.t0 = time.perf_counter()

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (B, 5)
        self.loss += float(loss.detach()) * len(y)
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(1).sum())
        self.n, self.batches = self.n + len(y), self.batches + 1

    def result(self, part: str) -> dict:
        n, secs = max(1, self.n), time.perf_counter() - self.t0
        return {f"{part}_loss": self.loss / n, f"{part}_top1": 100 * self.top1 / n,
                f"{part}_top5": 100 * self.top5 / n, f"{part}_samples": self.n,
                f"time_{part}_s": secs, f"throughput_{part}_img_s": self.n / secs}


def file_signature(path: str):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_checkpoint(path: str, device="cpu", need=("model", "structure")) -> dict:
    """A checkpoint through torch's safe loader: one that needs unsafe unpickling (which can run
    code, e.g. planted in a shared run directory) is refused, as is a truncated or foreign one."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    signature = file_signature(path)
    try:
        with warnings.catch_warnings(action="ignore"):  # e.g. "Detected pickle protocol 4"
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip, EOF, unpickling and storage errors all mean: not usable
        if what := re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(e)):
            found = (what[1].replace("global: GLOBAL", "the global")
                     .replace("operand", "pickle operand"))
            raise UsageError(f"{path} refused: the safe loader (weights_only) meets {found}, "
                             "which our checkpoints never hold; a full unpickle of it could "
                             "run code") from None
        reason = type(e).__name__ + (f": {str(e).splitlines()[0][:120]}" if str(e) else "")
        raise UsageError(f"{path} is not a readable checkpoint (truncated or damaged?): "
                         f"{reason}") from None
    missing = [k for k in need if k not in ckpt] if isinstance(ckpt, dict) else list(need)
    if missing or ("args" in need and not isinstance(ckpt["args"], dict)):
        raise UsageError(f"{path} is not a checkpoint of this code: it lacks "
                         f"{', '.join(missing) or 'its args'}")
    ckpt["loaded_from"] = (path, signature)  # claim_run_dir checks that nobody wrote it since
    return ckpt


def write_start(out: str, config: dict, profile: dict) -> None:
    """config.json (unless the run has it) and model_profile.json, then the run's first line."""
    if not os.path.exists(os.path.join(out, "config.json")):
        write_json(os.path.join(out, "config.json"), config | {"out": out})
    write_json(os.path.join(out, "model_profile.json"), profile)
    tqdm.write(f"{out}: {'static' if config['static'] else 'juliet'}-{config['backbone']} "
               f"params={profile['params'] / 1e6:.2f}M paper-convention MACs (one dummy input)="
               f"{profile['flops_paper_convention_macs'] / 1e6:.2f}M; "
               f"expected executed MACs per sample are measured on val every epoch")


def write_final_line(final: dict) -> None:
    tqdm.write(f"test_top1={final['test_top1']:.2f} test_top5={final['test_top5']:.2f} "
               f"paper_MMACs={final['flops_paper_convention_macs'] / 1e6:.2f} "
               f"exec_MMACs={final['test_executed_macs_per_sample'] / 1e6:.2f} "
               f"params={final['params'] / 1e6:.2f}M")


def write_epoch(out: str, log: dict, quiet: bool) -> None:
    """One line per epoch with fixed key=value fields, and the full record as epoch_<k>.json."""
    write_json(os.path.join(out, f"epoch_{log['epoch']}.json"), log)
    fields = [f"epoch={log['epoch']}", f"train_loss={log['train_loss']:.4f}",
              f"train_top1={log['train_top1']:.2f}", f"val_loss={log['val_loss']:.4f}",
              f"val_top1={log['val_top1']:.2f}", f"lr={log['lr']:.2e}",
              f"paper_MMACs={log['flops_paper_convention_macs'] / 1e6:.2f}"]
    if "val_executed_macs_per_sample" in log:
        fields += [f"exec_MMACs={log['val_executed_macs_per_sample'] / 1e6:.2f}",
                   f"nodes={log['n_nodes']}", f"events={len(log['events'])}"]
    tqdm.write(" ".join([*fields, f"time={log['time_epoch_s']:.1f}s"]))
