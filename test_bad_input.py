"""Bad input, table-driven: every case ends with a non-zero exit and one line on stderr that names the problem,
no traceback, and leaves every file that existed before byte-identical (and, unless the case says otherwise,
makes no file at all). Most cases run the scripts' own CLI entry points in-process (`runs.cli`,
`profile.main`); a few run as real subprocesses. Then what the cases cannot show: two runs started at once
into one --out, CIFAR download failing without a network, --eval-only beside a finished run, safe RNG state."""

import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import profile as prof  # Juliet's profile.py, first on sys.path
import runs
import train_cifar
import train_imagenet
from conftest import REPO, one_line_error, read_json, write_image_folder

TINY = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet"]
INET = ["--data-dir", "{t}/inet", "--input-size", "32", "--set", "holdout=3", *TINY]  # 12 train images
SYN = ["--dataset", "synthetic", "--set", "synthetic_size=40", *TINY]


class Evil:
    """A pickle that creates a file when unpickled: what a hostile checkpoint in a shared run directory does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# ----------------------------------------------------------------------------- fixtures of the cases


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished tiny static run (EfficientNet-B0, the smallest checkpoint); cases link its files, never write it."""
    out = tmp_path_factory.mktemp("base") / "run"
    train_cifar.main(train_cifar.parse_args(["--out", str(out), "--backbone", "efficientnet_b0", "--static", *SYN,
                                             "--set", "synthetic_size=80", "--set", "limit_batches=2"]))  # 16 test images
    return out


def clone(run, dst, skip=()):
    """The run's files hard-linked into dst (a file replaced by rename leaves the original alone)."""
    os.makedirs(dst)
    for name in os.listdir(run):
        if name not in (*skip, runs.LOCK) and os.path.isfile(os.path.join(run, name)):
            os.link(os.path.join(run, name), os.path.join(dst, name))
    return dst


def evil_run(t, run, raw=False, name="checkpoint.pt"):
    """A run directory whose `name` runs code when unpickled unsafely; the marker file shows it ran. An evil
    checkpoint.pt comes without model.pt (a run from before model.pt, which load_run would read instead)."""
    d = clone(run, t / "evil", skip=(name, "model_profile.json", *without_model(name)))
    payload = {"model": {}, "structure": None, "args": Evil(str(t / "PWNED"))}
    if raw:  # a plain pickle named checkpoint.pt
        (d / name).write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, d / name)
    return d


def without_model(name):
    """Files to leave out beside a damaged checkpoint.pt: model.pt, which checkpoints.load_run prefers to it."""
    return ("model.pt",) if name == "checkpoint.pt" else ()


def imgs(t, **kw):
    return write_image_folder(t / "imgs", **kw)


def edit(path, content: bytes):
    path.write_bytes(content)
    return path


def truncated(path):
    return edit(path, path.read_bytes()[: len(path.read_bytes()) // 2])


def lacks_class(t):
    root = imgs(t)
    shutil.rmtree(root / "test" / "class2")


def extra_class(t):
    root = imgs(t)
    shutil.copytree(root / "test" / "class1", root / "test" / "class9")


def empty_class(t):
    root = imgs(t)
    for f in (root / "test" / "class1").iterdir():
        f.unlink()


def with_run_files(t, run, skip):
    clone(run, t / "used", skip=skip)


def resume_dir(t, run, name, content):
    d = clone(run, t / "r", skip=(name, *without_model(name)))
    (d / name).write_bytes(content)


def imagenet_config(t, run, _holder):
    """The run as an ImageNet run that validated on its test set (holdout 0, §6.3's protocol)."""
    config = read_json(run / "config.json") | {"dataset": "imagenet", "holdout": 0}
    resume_dir(t, run, "config.json", json.dumps(config).encode())


def fake_checkpoint(t, run, args):
    """A checkpoint that passes the safe loader, with `args` (None: without them)."""
    ckpt = {k: {} for k in runs.CHECKPOINT_KEYS if k != "args"} | ({} if args is None else {"args": args})
    torch.save(ckpt, clone(run, t / "r", skip=("checkpoint.pt",)) / "checkpoint.pt")


def locked(t, lock_holder):
    os.makedirs(t / "busy")
    f = open(t / "busy" / runs.LOCK, "a")  # another open file: flock conflicts as with another process
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock_holder.append(f)


def imagenet(t, lacks=False, bad=False, empty=False, no_val=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in range(3 - (lacks and split == "val")):
            d = t / "inet" / split / f"n0{c}"
            os.makedirs(d)
            for i in range(0 if (empty and split == "val" and c == 2) else n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    if bad:
        truncated(t / "inet" / "train" / "n01" / "0.JPEG")
    if no_val:
        shutil.rmtree(t / "inet" / "val")


# ----------------------------------------------------------------------------- the table

T, IN, P = "train_cifar", "train_imagenet", "profile"
# (id, script, argv ({t}: the case's folder, {run}: the base run), exit code, text the line must hold,
#  setup(t, run, holder) or None, options: "sub" (a real subprocess), "files" (may make files under {t}/out))
CASES = [
    # flags out of range: argparse, exit 2, before anything
    ("unknown-backbone", T, ["--backbone", "vgg16", *SYN], 2, "resnet18", None, ""),
    ("threshold-above-1", T, ["--theta-grow", "1.5", *SYN], 2, "[0, 1]", None, ""),
    ("lr-nan", T, ["--lr", "nan", *SYN], 2, "--lr", None, "sub"),
    ("lr-negative", T, ["--lr", "-1", *SYN], 2, "--lr", None, ""),
    ("lr-inf", T, ["--lr", "inf", *SYN], 2, "--lr", None, ""),
    ("lr-not-a-number", T, ["--lr", "fast", *SYN], 2, "--lr", None, ""),
    ("input-size-0", T, ["--input-size", "0", *SYN], 2, "--input-size", None, ""),
    ("val-split-0", T, ["--set", "val_fraction=0", *SYN], 2, "--set val_fraction", None, ""),
    ("val-split-1", T, ["--set", "val_fraction=1", *SYN], 2, "--set val_fraction", None, ""),
    ("batch-size-0", T, [*SYN, "--batch-size", "0"], 2, "--batch-size", None, ""),
    ("epochs-0", T, [*SYN, "--epochs", "0"], 2, "--epochs", None, ""),
    ("workers-negative", T, [*SYN, "--workers", "-1"], 2, "--workers", None, ""),
    ("momentum-2", T, ["--set", "momentum=2", *SYN], 2, "--set momentum", None, ""),
    ("wd-negative", T, ["--wd", "-1e-4", *SYN], 2, "--wd", None, ""),
    ("lr-factor-1", T, ["--set", "lr_factor=1", *SYN], 2, "--set lr_factor", None, ""),
    ("tau0-0", T, ["--set", "tau0=0", *SYN], 2, "--set tau0", None, ""),
    ("loss-weight-negative", T, ["--set", "route_weight=-1", *SYN], 2, "--set route_weight", None, ""),
    ("knob-unknown", T, ["--set", "stop_bias=0", *SYN], 2, "--set stop_bias=0", None, ""),
    ("knob-not-a-pair", T, ["--set", "tau0", *SYN], 2, "NAME=VALUE", None, ""),
    ("seed-negative", T, ["--seed", "-3", *SYN], 2, "--seed", None, ""),
    ("eval-only-alone", T, ["--eval-only", *SYN], 2, "--resume", None, ""),
    ("imagenet-lr-nan", IN, ["--lr", "nan", *TINY], 2, "--lr", None, ""),
    # settings that only the data or the model can refute: exit 1, before any file
    ("heads-do-not-divide", T, ["--d-model", "10", "--n-head", "3", *SYN], 1, "divisible", None, ""),
    ("prebuild-too-deep", T, ["--prebuild", "9", *SYN], 1, "prebuild", None, ""),
    ("input-too-small", T, ["--backbone", "densenet121", "--input-size", "8", *SYN], 1, "--input-size 8", None, ""),
    ("val-split-leaves-none", T, [*SYN, "--set", "synthetic_size=20", "--set", "val_fraction=0.01"], 1, "val_fraction 0.01", None, ""),
    ("batch-above-train", T, [*SYN, "--batch-size", "64"], 1, "--batch-size 64", None, ""),
    ("loss-not-finite", T, [*SYN, "--lr", "1e30", "--out", "{t}/out"], 1, "loss is", None, "files"),  # in training
    ("cifar-absent-no-download", T, ["--data-dir", "{t}/nocifar", "--set", "download=false", *TINY], 1, "download=false", None,
     ""),
    ("folder-missing", T, ["--dataset", "imagefolder", "--data-dir", "{t}/nowhere", *TINY], 1, "does not exist",
     None, ""),
    ("image-wrong-size", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "28x28",
     lambda t, r, h: imgs(t, bad=28), ""),
    ("test-lacks-class", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "lacks class2",
     lambda t, r, h: lacks_class(t), ""),
    ("test-extra-class", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "extra class9",
     lambda t, r, h: extra_class(t), ""),
    ("class-without-images", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "class1",
     lambda t, r, h: empty_class(t), ""),
    ("png-truncated", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "class1/2.png",
     lambda t, r, h: truncated(imgs(t) / "train" / "class1" / "2.png"), ""),
    ("png-zero-bytes", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "class1/3.png",
     lambda t, r, h: edit(imgs(t) / "train" / "class1" / "3.png", b""), ""),
    ("png-fake", T, ["--dataset", "imagefolder", "--data-dir", "{t}/imgs", *TINY], 1, "class2/0.png",
     lambda t, r, h: edit(imgs(t) / "test" / "class2" / "0.png", b"<html>not an image</html>"), ""),
    ("imagenet-val-lacks-class", IN, INET, 1, "val/ lacks n02",
     lambda t, r, h: imagenet(t, lacks=True), ""),
    ("imagenet-val-class-empty", IN, INET, 1, "n02",
     lambda t, r, h: imagenet(t, empty=True), ""),
    ("imagenet-val-missing", IN, INET, 1, "val does not exist",
     lambda t, r, h: imagenet(t, no_val=True), ""),
    ("imagenet-holdout-leaves-none", IN, [*INET, "--set", "holdout=12"], 1, "holdout 12 holds out 12 of 12",
     lambda t, r, h: imagenet(t), ""),
    ("imagenet-holdout-0-would-fit-on-test", IN, [*INET, "--set", "holdout=0"], 1,
     "--keep best, --calibrate, --set prune_kept=true would fit on it", lambda t, r, h: imagenet(t), ""),
    ("imagenet-holdout-0-static-keep-best", IN, [*INET, "--set", "holdout=0", "--static"], 1,
     "and --keep best would fit on it", lambda t, r, h: imagenet(t), ""),
    ("imagenet-missing", IN, ["--data-dir", "{t}/nothing", "--input-size", "32", *TINY], 1, "train does not exist",
     None, ""),
    ("imagenet-jpeg-truncated-in-a-worker", IN, [*INET, "--backbone", "resnet18", "--static", "--out", "{t}/out",
     "--batch-size", "2", "--workers", "1"], 1,
     "n01/0.JPEG",
     lambda t, r, h: imagenet(t, bad=True), "files"),  # decoded lazily: the run directory exists by then
    # run directories: nothing a user has is replaced
    ("out-holds-a-run", T, [*SYN, "--out", "{run}"], 1, "--resume", None, ""),
    ("out-holds-a-run-without-checkpoint", T, [*SYN, "--out", "{t}/used"], 1, "config.json",
     lambda t, r, h: with_run_files(t, r, skip=("checkpoint.pt",)), ""),
    ("out-held-by-another-process", T, [*SYN, "--static", "--out", "{t}/busy"], 1, "another process",
     lambda t, r, h: locked(t, h), ""),
    ("out-under-a-file", T, [*SYN, "--out", "{t}/afile/run"], 1, "cannot write",
     lambda t, r, h: edit(t / "afile", b""), ""),
    ("resume-missing", T, ["--resume", "{t}/nothing"], 1, "no such run directory", None, ""),
    ("resume-without-checkpoint", T, ["--resume", "{t}/empty"], 1, "no checkpoint",
     lambda t, r, h: os.makedirs(t / "empty"), ""),
    ("resume-truncated-checkpoint", T, ["--resume", "{t}/r"], 1, "truncated",
     lambda t, r, h: resume_dir(t, r, "checkpoint.pt", (r / "checkpoint.pt").read_bytes()[:4096]), ""),
    ("resume-checkpoint-without-args", T, ["--resume", "{t}/r"], 1, "lacks args",
     lambda t, r, h: fake_checkpoint(t, r, args=None), ""),
    ("resume-checkpoint-of-text", T, ["--resume", "{t}/r"], 1, "not a readable checkpoint",
     lambda t, r, h: resume_dir(t, r, "checkpoint.pt", b"hello"), ""),
    ("resume-malicious-checkpoint", T, ["--resume", "{t}/evil"], 1, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("resume-malicious-plain-pickle", T, ["--resume", "{t}/evil"], 1, "refused",
     lambda t, r, h: evil_run(t, r, raw=True), ""),
    ("eval-only-malicious-checkpoint", T, ["--resume", "{t}/evil", "--eval-only"], 1, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("eval-only-malicious-model", T, ["--resume", "{t}/evil", "--eval-only"], 1, "refused",
     lambda t, r, h: evil_run(t, r, name="model.pt"), ""),
    ("imagenet-resume-malicious-checkpoint", IN, ["--resume", "{t}/evil"], 1, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("resume-other-backbone", T, ["--resume", "{run}", "--backbone", "resnet101"], 1, "--backbone resnet101", None,
     ""),
    ("resume-other-dataset", T, ["--resume", "{run}", "--dataset", "cifar10"], 1, "--dataset cifar10", None, ""),
    ("resume-static-flag", T, ["--resume", "{t}/r", "--static"], 1, "--static True",
     lambda t, r, h: fake_checkpoint(t, r, args={"static": False, "backbone": "resnet18"}), ""),
    ("resume-other-selector", T, ["--resume", "{run}", "--selector", "mlp"], 1, "--selector mlp", None, ""),
    ("resume-other-lr", T, ["--resume", "{run}", "--lr", "0.5"], 1, "--lr 0.5", None, ""),
    ("resume-other-out", T, ["--resume", "{run}", "--out", "{t}/elsewhere"], 1, "differ", None, ""),
    ("resume-damaged-config", T, ["--resume", "{t}/r"], 1, "config.json",
     lambda t, r, h: resume_dir(t, r, "config.json", b'{"backbone": "resn'), ""),
    # profile.py: exit 2
    ("profile-malicious-checkpoint", P, ["{t}/evil"], 2, "refused", lambda t, r, h: evil_run(t, r), ""),
    ("profile-malicious-model", P, ["{t}/evil"], 2, "refused", lambda t, r, h: evil_run(t, r, name="model.pt"), ""),
    ("profile-table-malicious-checkpoint", P, ["--table", "{t}/evil"], 2, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("profile-bench-run-malicious-checkpoint", P, ["--bench", "--run", "{t}/evil"], 2, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("profile-curve-malicious-checkpoint", P, ["{t}/evil", "--curve"], 2, "refused",
     lambda t, r, h: evil_run(t, r), ""),
    ("profile-calibrate-on-a-test-set", P, ["{t}/r", "--calibrate"], 2, "--calibrate would fit on the test set",
     imagenet_config, ""),
    ("profile-budget-on-a-test-set", P, ["{t}/r", "--curve", "--budget", "5"], 2, "--budget would fit on the test",
     imagenet_config, ""),
    ("profile-curve-budget-negative", P, ["{run}", "--curve", "--budget", "-1"], 2, "--budget", None, ""),
    ("profile-garbage-config", P, ["{t}/r"], 2, "config.json",
     lambda t, r, h: resume_dir(t, r, "config.json", bytes(range(256))), ""),
    ("profile-config-unknown-backbone", P, ["{t}/r"], 2, "vgg16",
     lambda t, r, h: resume_dir(t, r, "config.json", b'{"backbone": "vgg16", "num_classes": 10, "dataset": "x", '
                                                     b'"input_size": 32}'), ""),
    ("profile-config-a-list", P, ["{t}/r"], 2, "config.json", lambda t, r, h: resume_dir(t, r, "config.json", b"[]"),
     ""),
    ("profile-truncated-checkpoint", P, ["{t}/r"], 2, "truncated",
     lambda t, r, h: resume_dir(t, r, "checkpoint.pt", (r / "checkpoint.pt").read_bytes()[:4096]), ""),
    ("profile-truncated-model", P, ["{t}/r"], 2, "truncated",
     lambda t, r, h: resume_dir(t, r, "model.pt", (r / "model.pt").read_bytes()[:4096]), ""),
    ("profile-table-garbage-final", P, ["--table", "{t}/r"], 2, "final.json",
     lambda t, r, h: resume_dir(t, r, "final.json", b"{{"), ""),
    ("profile-table-final-not-a-number", P, ["--table", "{t}/r"], 2, "not a number",
     lambda t, r, h: resume_dir(t, r, "final.json", b'{"test_top1": "high"}'), ""),
    ("profile-missing-run", P, ["{t}/nothing"], 2, "no such run directory", None, ""),
    ("profile-unknown-backbone", P, ["--backbone", "vgg16"], 2, "resnet18", None, ""),
    ("profile-bench-repeats-0", P, ["--bench", "--backbone", "resnet18", "--repeats", "0"], 2, "--repeats", None, ""),
    ("profile-bench-batch-0", P, ["--bench", "--backbone", "resnet18", "--batch", "0"], 2, "--batch", None, ""),
    ("profile-input-size-0", P, ["--backbone", "resnet18", "--input-size", "0"], 2, "--input-size", None, ""),
]


_HASHES = {}


def digests(root):
    """{path: sha256} of every file under root (hashed again whenever its inode, size or mtime changed)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(open(p, "rb").read()).hexdigest()
            out[p] = _HASHES[key]
    return out


def run_case(script, argv, sub, capsys):
    """(exit code, stderr) of the script's CLI on argv: in-process through its own entry point, or a subprocess."""
    if sub:
        proc = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=REPO, capture_output=True, text=True)
        return proc.returncode, proc.stderr
    module = {T: train_cifar, IN: train_imagenet}.get(script)
    with pytest.raises(SystemExit) as e:
        if module is None:
            prof.main(argv)
        else:
            runs.cli(module.main, lambda: module.parse_args(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_lost(case, base_run, tmp_path, capsys):
    name, script, argv, code, needle, setup, options = case
    holder = []
    if setup is not None:
        setup(tmp_path, base_run, holder)
    argv = [a.format(t=tmp_path, run=base_run) for a in argv]
    before = digests(tmp_path) | digests(base_run)
    try:
        got, err = run_case(script, argv, "sub" in options, capsys)
    finally:
        for f in holder:
            f.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err[-3000:])
    assert needle in lines[0], lines[0]
    after = digests(tmp_path) | digests(base_run)
    assert {p: h for p, h in after.items() if p in before} == before, "a file that existed was changed or removed"
    new = set(after) - set(before)
    if "files" in options:
        new = {p for p in new if not p.startswith(str(tmp_path / "out"))}
    assert not new, f"bad input made files: {sorted(new)}"
    assert not (tmp_path / "PWNED").exists(), "a checkpoint ran code"


def test_the_malicious_checkpoint_does_run_code_when_loaded_unsafely(base_run, tmp_path):
    """The cases above are meaningful: the same file creates its marker through an unsafe torch.load."""
    d = evil_run(tmp_path, base_run)
    torch.load(d / "checkpoint.pt", weights_only=False)
    assert (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- beyond one command


def test_two_runs_started_at_once_into_one_out(tmp_path):
    """One runs, the other ends with one line; the winner's files are its own (config, checkpoint, epochs)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train_cifar.py", "--out", str(out), "--backbone", "efficientnet_b0", "--static", *SYN,
           "--epochs", "2", "--set", "limit_batches=1"]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], (codes, errs)
    winner, loser = (1, 2) if codes[0] == 0 else (2, 1)
    line = [ln for ln in errs[loser - 1].splitlines() if ln.strip()]
    assert len(line) == 1 and ("another process is writing" in line[0] or "already holds a run" in line[0]), line
    assert read_json(out / "config.json")["seed"] == winner
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["seed"] == winner
    assert [read_json(out / f"epoch_{k}.json")["epoch"] for k in (1, 2)] == [1, 2]
    assert read_json(out / "final.json")["epochs"] == 2


def test_a_run_being_written_is_named_as_such_before_any_work(tmp_path):
    """A second run into a directory that another process holds (its first files written, the lock taken) is
    told that, not to move the files away, and touches nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with open(out / runs.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run([sys.executable, "train_cifar.py", "--out", str(out), *SYN], cwd=REPO,
                              capture_output=True, text=True)
    assert "another process is writing" in one_line_error(proc, code=1)
    assert sorted(os.listdir(out)) == [runs.LOCK, "config.json"] and (out / "config.json").read_text() == "{}"


def test_cifar_download_failure_offline_is_one_line_and_leaves_nothing(tmp_path):
    """CIFAR is downloaded by default; with no network (a proxy that refuses), one line says how to point
    --data-dir at a copy, and the folder the download made is gone again."""
    closed = "http://127.0.0.1:9"
    env = os.environ | {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
                        "no_proxy": "", "NO_PROXY": ""}
    proc = subprocess.run([sys.executable, "train_cifar.py", "--data-dir", str(tmp_path / "data"),
                           "--out", str(tmp_path / "run"), *TINY], cwd=REPO, env=env, capture_output=True, text=True)
    line = one_line_error(proc, code=1)
    assert "downloading cifar10" in line and "--data-dir" in line and "cifar-10-batches-py" in line, line
    assert os.listdir(tmp_path) == []


def test_eval_only_writes_beside_the_run_and_accepts_unchanged_flags(base_run, tmp_path, capsys):
    run = clone(base_run, tmp_path / "run")
    os.makedirs(run / "eval_1")  # an earlier evaluation's folder: kept
    before = digests(run)
    argv = ["--resume", str(run), "--eval-only", "--set", "limit_batches=1", "--dataset", "synthetic", "--static",
            "--backbone", "efficientnet_b0", "--quiet"]  # the run's own values: accepted
    final = train_cifar.main(train_cifar.parse_args(argv))
    assert digests(run).items() >= before.items(), "--eval-only replaced a file of the run"
    assert final["test_samples"] == 8 and read_json(run / "eval_2" / "final.json")["test_samples"] == 8
    assert read_json(run / "final.json")["test_samples"] == 16 and os.listdir(run / "eval_1") == []


def test_one_class_data_warns(tmp_path, capsys):
    root = write_image_folder(tmp_path / "one", classes=1, n_per_class=10)
    config = vars(train_cifar.parse_args(["--dataset", "imagefolder", "--data-dir", str(root), "--out", "x"]))
    train, _, test, classes = data.cifar_datasets(config)
    assert classes == 1 and len(train) == 9 and len(test) == 10
    assert "one class" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["synthetic", "imagefolder"])
def test_input_size_is_honoured(dataset, tmp_path):
    root = write_image_folder(tmp_path / "imgs", size=20)
    config = vars(train_cifar.parse_args(["--dataset", dataset, "--data-dir", str(root), "--input-size", "20",
                                          "--set", "synthetic_size=20", "--out", "x"]))
    train, val, test, _ = data.cifar_datasets(config)
    assert train[0][0].shape == val[0][0].shape == test[0][0].shape == (3, 20, 20)


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both
    torch.save({"rng": runs.rng_state()}, tmp_path / "s.pt")
    expected = random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()
    runs.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
