"""Script behaviour: train_cifar.py and train_imagenet.py end to end on tiny datasets written to disk in the
real formats (CIFAR-10 pickles, ImageFolder PNG/JPEG), the run directory, resume (bad input: test_bad_input.py)."""

import functools
import hashlib
import math
import os
import pickle
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import checkpoints
import data
import measure
import recipes
import train_cifar
import train_imagenet
from backbones import make_backbone, static_model
from conftest import REPO, cifar_args, one_line_error, read_json, write_image_folder

# ----------------------------------------------------------------------------- train_cifar.py

RUN_FILES = ["config.json", "model_profile.json", "epoch_1.json", "checkpoint.pt", "model.pt", "final.json",
             "accuracy.png"]
EPOCH_KEYS = ["train_loss", "val_loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr", "params",
              "train_flops_epoch_paper_convention_macs", "time_train_s", "time_val_s", "events",
              "energy_train_j", "energy_train_status", "peak_memory_bytes"]
JULIET_EPOCH_KEYS = ["val_node_visits", "val_node_throughput_img_s", "val_executed_macs_per_sample",
                     "train_flops_epoch_executed_macs", "train_node_visits", "n_nodes"]
FINAL_KEYS = ["test_top1", "test_top5", "test_executed_macs_per_sample", "flops_paper_convention_macs", "params"]


def write_cifar10(root, n_train=40, n_test=20, seed=0):
    """A tiny CIFAR-10 in the real on-disk format (cifar-10-batches-py, pickled batches).

    torchvision checks each file's md5 against the real release; the tests pin those checksums to the
    tiny files' own (see `pinned_cifar10`), so the real parsing and integrity-check code runs on them.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        labels = (np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = (np.array(labels)[:, None] * 25).astype(np.uint8)  # red channel encodes the class
        with open(os.path.join(folder, name), "wb") as f:
            # the real files are Python 2 pickles whose keys load as str under encoding="latin1"
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_train // 5}, f, protocol=2)
    return {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in [*names, "batches.meta"]}


@pytest.fixture
def pinned_cifar10(tmp_path, monkeypatch):
    md5 = write_cifar10(tmp_path / "cifar")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setitem(cls.meta, "md5", md5["batches.meta"])
    return tmp_path / "cifar"


def test_cifar10_batches_through_torchvision_loader_static_baseline(pinned_cifar10, tmp_path):
    out = tmp_path / "run"
    final = train_cifar.main(cifar_args(out, "--dataset", "cifar10", "--data-dir", str(pinned_cifar10), "--static"))
    config = read_json(out / "config.json")
    assert (config["train_size"], config["val_size"], config["test_size"]) == (36, 4, 20)  # 90/10 split
    profile_json = read_json(out / "model_profile.json")
    macs, params = measure.paper_macs(static_model("resnet18", num_classes=10), input_size=32)
    assert (profile_json["flops_paper_convention_macs"], profile_json["params"]) == (macs, params)
    assert profile_json["proxy"] is False and final["flops_paper_convention_macs"] == macs
    for name in RUN_FILES:
        assert (out / name).exists(), name


def test_one_epoch_writes_the_run_directory(tmp_path, backbone="resnet18"):
    """The run directory, for one backbone (every backbone's trie: test_juliet.py)."""
    data = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    final = train_cifar.main(cifar_args(out, "--dataset", "imagefolder", "--data-dir", str(data),
                                        "--backbone", backbone, "--grow-prune", "both", "--grow-every", "1",
                                        "--theta-grow", "0",
                                        "--set", "grow_statistic=sigma2"))  # cheap growth
    for name in [*RUN_FILES, "node_usage.png", "trie.png"]:
        assert (out / name).exists(), name
    epoch = read_json(out / "epoch_1.json")
    assert all(k in epoch for k in EPOCH_KEYS + JULIET_EPOCH_KEYS), set(EPOCH_KEYS + JULIET_EPOCH_KEYS) - set(epoch)
    assert all(k in final for k in FINAL_KEYS)
    times = [read_json(out / f"epoch_{e}.json")["time_train_s"] for e in range(1, final["epochs"] + 1)]
    assert final["time_train_epoch_s"] == statistics.median(times)  # training wall time per epoch
    assert epoch["n_nodes"] > len(make_backbone(backbone).stages)  # stop children, plus growth at threshold 0
    assert any(e["kind"] == "grow" for e in epoch["events"])
    assert math.isnan(epoch["energy_train_j"]) and epoch["energy_train_status"]  # no NVML on CPU: NaN + reason
    assert 0 < final["test_executed_macs_per_sample"]
    profile_json = read_json(out / "model_profile.json")
    assert profile_json["proxy"] is True and profile_json["dataset"] == "imagefolder"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # tensors and plain containers only
    assert {"model", "structure", "optimizer", "scheduler", "run", "args", "rng"} <= set(ckpt)
    # the kept model: the best epoch's weights with their stop decisions fitted on val (keep_and_calibrate)
    kept = final["evaluated_checkpoint"]
    assert kept["keep"] == "best" and kept["epoch"] == 1 and kept["stop_tolerance"] == 0.5 and kept["calibration"]
    assert {"train_flops_epoch_static_macs", "train_flops_epoch_executed_macs"} <= set(final)
    _, model = checkpoints.load_run(str(out))  # model.pt, not checkpoint.pt
    assert model.options["stop_threshold"] == kept["val_operating_point"]["t"] and model.options["stage_grad"] == 0.0
    assert {n.node_id for n in model.nodes() if n.selector is not None and n.selector.calibrated} == \
        set(kept["calibration"])
    assert isinstance(kept["pruned"], list)  # --prune-kept: siblings validation rarely reaches, gone before calibration
    assert not set(kept["pruned"]) & {n.node_id for n in model.nodes()}


def assert_same(a, b, where="checkpoint"):
    """Nested containers of tensors and plain values equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


RESUME = ["--dataset", "synthetic", "--set", "synthetic_size=160", "--batch-size", "16", "--selector", "mlp",
          "--grow-every", "2", "--theta-grow", "0", "--prune-every", "1", "--t-min", "1", "--seed", "3",
          "--grow-prune", "both", "--workers", "0", "--quiet"]  # the default statistic, sibling and horizon


def resumed_state(out) -> dict:
    """What a resumed run must carry on from: weights, trie, optimizer, scheduler, scaler, RNG and
    the run's counters (not its logs' wall times)."""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    run = {k: ckpt["run"][k] for k in ("epoch", "step", "best_val_top1", "best_epoch", "best_score")}
    return {k: ckpt[k] for k in ("model", "structure", "optimizer", "scheduler", "scaler", "rng")} | {"run": run}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "a"
    train_cifar.main(train_cifar.parse_args(["--out", str(out), "--epochs", "2", *RESUME]))
    return out


@pytest.mark.parametrize("stop", ["epoch boundary", "mid-epoch kill"])
def test_resume_is_exact(tmp_path, monkeypatch, uninterrupted, stop):
    """Stopped after epoch 1, or killed halfway through epoch 2's steps, then resumed, a run that grows
    and prunes ends with the uninterrupted run's model, optimizer, scheduler and RNG state bit for bit."""
    a, b = uninterrupted, tmp_path / "b"
    if stop == "epoch boundary":
        train_cifar.main(train_cifar.parse_args(["--out", str(b), "--epochs", "1", *RESUME]))
    else:  # Ctrl-C in the 5th of 9 steps, after epoch 2 grew a child and before its end-of-epoch sweep
        calls, loss = [0], train_cifar.juliet_loss

        @functools.wraps(loss)  # the same signature: the loss weights are read from it
        def interrupted(*a, **k):
            calls[0] += 1
            if calls[0] == 9 + 5:
                raise KeyboardInterrupt
            return loss(*a, **k)

        monkeypatch.setattr(train_cifar, "juliet_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_cifar.main(train_cifar.parse_args(["--out", str(b), "--epochs", "2", *RESUME]))
        monkeypatch.setattr(train_cifar, "juliet_loss", loss)
        assert (b / "epoch_1.json").exists() and not (b / "epoch_2.json").exists()
    train_cifar.main(train_cifar.parse_args(["--resume", str(b), "--epochs", "2", "--quiet"]))
    ea = read_json(a / "epoch_2.json")
    assert {e["kind"] for e in ea["events"]} == {"grow", "prune"}, "resume must restore a grown, pruned trie"
    assert_same(resumed_state(a), resumed_state(b))
    for k in ["train_loss", "val_loss", "val_top1", "lr", "structure", "events", "val_leaf_counts"]:
        assert ea[k] == read_json(b / "epoch_2.json")[k], k
    assert read_json(a / "final.json")["test_top1"] == read_json(b / "final.json")["test_top1"]
    # the resumed checkpoint still records the flags its user chose, plus the runtime flag given at resume
    explicit = torch.load(b / "checkpoint.pt", weights_only=True)["args"]["explicit"]
    assert {"dataset", "selector", "grow_every", "seed", "out", "epochs"} <= set(explicit)


def test_kept_model_is_what_final_json_and_eval_only_describe(tmp_path):
    """model.pt holds the tested model (calibrated: --eval-only scores it again exactly); --keep last
    --no-calibrate keeps the last epoch as trained, and --stage-grad reaches the model."""
    common = ["--dataset", "synthetic", "--set", "synthetic_size=60", "--batch-size", "10", "--selector", "mlp",
              "--workers", "0", "--set", "limit_batches=2", "--quiet"]
    a = tmp_path / "a"
    final = train_cifar.main(train_cifar.parse_args(["--out", str(a), "--epochs", "2", *common]))
    kept = final["evaluated_checkpoint"]
    best = max((1, 2), key=lambda e: (read_json(a / f"epoch_{e}.json")["val_full_depth_top1"], e))  # ties: later
    assert kept["keep"] == "best" and kept["epoch"] == best == torch.load(a / "model.pt")["epoch"]
    again = train_cifar.main(train_cifar.parse_args(["--resume", str(a), "--eval-only", "--set", "limit_batches=2",
                                                     "--quiet"]))
    for k in ("test_top1", "test_executed_macs_per_sample", "test_leaf_counts"):
        assert again[k] == final[k], k
    b = tmp_path / "b"
    final = train_cifar.main(train_cifar.parse_args(["--out", str(b), "--epochs", "2", "--keep", "last",
                                                     "--no-calibrate", "--set", "stage_grad=0.5", *common]))
    assert final["evaluated_checkpoint"] == {"keep": "last", "epoch": 2}
    _, model = checkpoints.load_run(str(b))
    assert model.options["stop_threshold"] is None and model.options["stage_grad"] == 0.5
    assert not any(n.selector.calibrated for n in model.nodes() if n.selector is not None)


def test_synthetic_set_is_seeded_learnable_shape_and_mixed():
    a, b = data.SyntheticImages(200, seed=5), data.SyntheticImages(200, seed=5)
    assert np.array_equal(a.data, b.data) and a.targets == b.targets
    assert a.data.shape == (200, 32, 32, 3) and a.data.dtype == np.uint8
    assert set(a.targets) == set(range(10)) and 0.35 < float(a.hard.float().mean()) < 0.65
    c = data.SyntheticImages(200, seed=6)
    assert not np.array_equal(a.data, c.data)
    # easy samples carry their class colour: the class mean colour separates them, the hard ones' does not
    img = torch.tensor(a.data).float().mean((1, 2))  # (N, 3)
    y = torch.tensor(a.targets)
    spread = [img[(y == k) & ~a.hard].std(0).mean() for k in range(10)]
    assert max(spread) < 20


def run_cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "train_cifar.py", *argv], cwd=cwd, capture_output=True, text=True)


def test_cifar10_missing_says_how_to_download(tmp_path):
    # downloading is the default (offline, see test_bad_input.py); --set download=false forbids it
    argv = ("--data-dir", str(tmp_path), "--epochs", "1", "--quiet", "--set", "download=false")
    line = one_line_error(run_cli(*argv), code=1)
    assert "download=false" in line and str(tmp_path) in line


def test_help_names_the_paper_source_of_defaults():
    text = run_cli("--help").stdout
    assert "Table 2" in text and "Alg. 2" in text and "§4.1" in text


# ----------------------------------------------------------------------------- train_imagenet.py


def write_imagenet(root):
    """A tiny ImageNet in ImageFolder layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, odd image sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c in range(3):
            d = os.path.join(root, split, f"n0{c}")
            os.makedirs(d)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.JPEG"))
    return root


def test_imagenet_one_epoch_writes_the_run_directory(tmp_path):
    data, out = write_imagenet(tmp_path / "inet"), tmp_path / "run"
    args = train_imagenet.parse_args(["--data-dir", str(data), "--input-size", "32", "--epochs", "1",
                                      "--batch-size", "4", "--workers", "0", "--lr", "0.01", "--out", str(out),
                                      "--quiet", "--set", "holdout=9"])
    assert (args.backbone, args.optimizer, args.scheduler, args.prebuild) == ("resnet101", "sgd", "cosine", 10)
    final = train_imagenet.main(args)
    # validation is 9 held-out training images, the test set ImageNet's val/; the kept model is calibrated
    config = read_json(out / "config.json")
    assert (config["train_size"], config["val_size"], config["test_size"]) == (9, 9, 9)
    kept = final["evaluated_checkpoint"]
    assert kept["keep"] == "best" and kept["calibration"] and "val_operating_point" in kept
    for name in [*RUN_FILES, "energy.png", "top1_per_gflop.png", "trie.png"]:
        assert (out / name).exists(), name
    epoch = read_json(out / "epoch_1.json")
    for key in ["energy_train_j", "energy_val_j", "energy_train_j_per_image", "throughput_train_img_s",
                "val_node_visits", "val_class_depth", "val_node_throughput_img_s"]:
        assert key in epoch, key
    assert math.isnan(epoch["energy_train_j"]) and math.isnan(epoch["energy_val_j"])
    assert "NVML" in epoch["energy_train_status"]
    assert set(epoch["val_class_depth"]) == {"0", "1", "2"}
    assert epoch["n_nodes"] >= 10 and final["test_samples"] == 9


def test_recipe_paper_turns_every_deviation_off_and_explicit_flags_still_win(tmp_path):
    ours = train_cifar.parse_args(["--out", str(tmp_path / "a")])
    paper = train_cifar.parse_args(["--recipe", "paper", "--out", str(tmp_path / "b")])
    assert (ours.train_depth, ours.stop_rule, ours.calibrate, ours.keep) == ("full", "half", True, "best")
    ours_imagenet = train_imagenet.parse_args(["--out", str(tmp_path / "e")])  # ImageNet's alone holds out
    for flag, value in recipes.RECIPES["paper"].items():
        assert getattr(paper, flag) == value != getattr(ours_imagenet if flag == "holdout" else ours, flag), flag
    # alpha forgets over --usage-horizon epochs (a quarter: 10 steps of a 40-step epoch); the paper's, per step
    assert train_cifar.build_model(ours, 10, 40).options["usage_beta"] == 1 - 1 / 10
    assert train_cifar.build_model(paper, 10, 40).options["usage_beta"] == paper.ema_beta == 0.99
    mixed = train_cifar.parse_args(["--recipe", "paper", "--keep", "best", "--out", str(tmp_path / "c")])
    assert mixed.keep == "best" and mixed.stop_rule == "argmax" and "recipe" in mixed.explicit
    imagenet = train_imagenet.parse_args(["--recipe", "paper", "--out", str(tmp_path / "d")])
    assert imagenet.lr == 0.1 and imagenet.train_depth == "routed"  # Table 3's defaults stay


def test_every_setting_has_a_single_default():
    """The library's defaults are the command line's: each keyword argument of the library (trie,
    routers, grow_prune, losses, calibrate) that shares a name with a setting of `train_cifar.py`
    with no flags has that setting's value, so a copied module trains as the script does."""
    import inspect

    import calibrate
    import grow_prune
    import losses
    import routers
    import trie

    args = vars(train_cifar.parse_args(["--out", "unused"]))  # `optimizer` below is an object, not a name
    checked = {}
    for module in (trie, routers, grow_prune, losses, calibrate):
        for name, fn in inspect.getmembers(module, callable):
            if getattr(fn, "__module__", None) != module.__name__:
                continue
            for p in inspect.signature(fn).parameters.values():
                if p.name in args and p.name != "optimizer" and p.default is not inspect.Parameter.empty:
                    assert p.default == args[p.name], (f"{module.__name__}.{name}", p.name)
                    checked.setdefault(p.name, []).append(name)
    assert {"selector", "stage_grad", "grow_prune", "grow_statistic", "split_weight", "exit_confidence",
            "cost_weight", "d_model", "ema_beta", "prune_kept", "tau0"} <= checked.keys(), checked
