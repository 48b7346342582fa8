"""Held out everywhere: no decision of a run reads its test set. The kept epoch, the kept trie's
pruning, the stop calibration and the operating point come from the validation split alone, on the
CIFAR protocol (train_cifar.py) and on the ImageNet one (train_imagenet.py, which holds training
images out because ImageNet's val set is its test set); where validation is the test set, the
settings that would fit on it are refused."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_cifar
import train_imagenet
from conftest import read_json

# Growth at every other step, Alg. 3 every epoch and on the kept trie, the best of 3 epochs kept,
# then calibrated: every decision that could read the test set is taken
TRAIN = ["--epochs", "3", "--batch-size", "8", "--workers", "0", "--quiet", "--selector", "mlp",
         "--grow-prune", "both", "--grow-every", "2", "--theta-grow", "0", "--prune-every", "1",
         "--t-min", "1", "--theta-prune", "0.45", "--input-size", "16", "--backbone", "resnet18", "--seed", "5"]


def write_folder(root, parts: dict, seed: int):
    """An ImageFolder per part (`{"train": 16, "test": 6}` images per class, 3 classes) of 16x16
    PNGs: a class colour under noise, learnable but not at once."""
    rng = np.random.default_rng(seed)
    for part, n in parts.items():
        for c in range(3):
            os.makedirs(os.path.join(root, part, f"c{c}"))
            for i in range(n):
                img = rng.normal(60 * c + 40, 50, (16, 16, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, part, f"c{c}", f"{i}.png"))
    return root


def scramble(root, part: str, seed: int) -> None:
    """The part's images replaced by uniform noise and its labels shuffled: each class folder keeps
    its count, but holds other images, in another order."""
    rng = np.random.default_rng(seed)
    n = len(os.listdir(root / part / "c0"))
    shutil.rmtree(root / part)
    for c in range(3):
        os.makedirs(root / part / f"c{c}")
        for _ in range(n):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / part / f"c{c}" / f"{rng.integers(1 << 30)}.png")


def decisions(out) -> dict:
    """What a run decided: the kept epoch, the pruned nodes, the calibration and the operating point,
    and the kept model itself, weights and structure."""
    kept = read_json(out / "final.json")["evaluated_checkpoint"]
    model = torch.load(out / "model.pt", weights_only=True)
    return {"kept": kept, "structure": model["structure"],
            "model": {k: v.tolist() for k, v in model["model"].items()}}


@pytest.mark.parametrize("protocol", ["cifar", "imagenet"])
def test_no_decision_reads_the_test_set(tmp_path, protocol):
    """Two runs whose test sets differ in every image and label decide the same: the same kept
    epoch, pruned nodes, calibration, operating point and kept model, bit for bit."""
    test_part = "test" if protocol == "cifar" else "val"
    script = train_cifar if protocol == "cifar" else train_imagenet
    extra = ["--dataset", "imagefolder"] if protocol == "cifar" else ["--set", "holdout=12", "--lr", "0.01", "--prebuild", "5",
                                                                      "--set", "stop_go=selector"]  # so that it prunes
    finals = []
    for name in ("real", "scrambled"):
        root = write_folder(tmp_path / name, {"train": 16, test_part: 6}, seed=0)
        if name == "scrambled":
            scramble(root, test_part, seed=1)
        out = tmp_path / f"run-{name}"
        finals.append(script.main(script.parse_args(["--data-dir", str(root), "--out", str(out), *TRAIN,
                                                     *extra])))
    real, scrambled = decisions(tmp_path / "run-real"), decisions(tmp_path / "run-scrambled")
    kept = real["kept"]
    assert kept["keep"] == "best" and kept["calibration"] and "val_operating_point" in kept and kept["pruned"]
    assert read_json(tmp_path / "run-real" / "config.json")["val_size"] == (12 if protocol == "imagenet" else 5)
    assert real == scrambled
    # the test sets did differ, and the test was run on each: its numbers are not the same
    assert finals[0]["test_loss"] != finals[1]["test_loss"]


def test_imagenet_defaults_hold_out_calibrate_and_keep_the_best_and_the_paper_recipe_does_not():
    ours = train_imagenet.parse_args(["--data-dir", "x"])
    assert (ours.holdout, ours.calibrate, ours.keep, ours.prune_kept) == (50000, True, "best", True)
    paper = train_imagenet.parse_args(["--data-dir", "x", "--recipe", "paper"])
    assert (paper.holdout, paper.calibrate, paper.keep, paper.prune_kept) == (0, False, "last", False)
