"""Shared test helpers: small tries whose samples take different paths, tiny datasets in the real formats.

Run the suite with `make test` (or .venv/bin/python -m pytest -q).
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backbones import Backbone, Stage, make_backbone
from trie import JulietNet

REPO = os.path.dirname(os.path.abspath(__file__))
# `make test` runs two pytest-xdist workers on CI's 2 cores: one thread each, so that they do not oversubscribe
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def r18():
    return make_backbone("resnet18")


def grown_trie(backbone, selector="transformer", seed=0, stop_go="selector", **kw):
    """A trie with siblings at depths 1 and 2, so that samples of one batch take different paths
    (every node's selector reads its features: an untrained exit's confidence spreads nothing)."""
    torch.manual_seed(seed)
    net = JulietNet(backbone, selector=selector, stop_go=stop_go, **kw)
    net.add_child(net.root)                  # 0/1: a second stage-1 specialist
    net.add_child(net.node("0/0"))           # 0/0/1
    net.add_child(net.node("0/1"))           # 0/1/0: 0/1 was a leaf; it gains a stop child too
    return net


def varied_batch(n, gen):
    """Images that differ in contrast and colour, so that routing has something to tell apart."""
    return (torch.randn(n, 3, 32, 32, generator=gen) * 3 * torch.rand(n, 1, 1, 1, generator=gen)
            + 2 * torch.randn(n, 3, 1, 1, generator=gen))


def spread_loss(record):
    """§2.2's balance formula over every choice of every decision, stop included: spreads traffic everywhere."""
    return torch.stack([r.P.shape[1] * (r.P.mean(0) - 1.0 / r.P.shape[1]).pow(2).sum() for r in record.routed]).mean()


def routed_trie(backbone, selector="mlp", seed=0, steps=20):
    # the transformer selector starts out less sensitive to its input than the MLP; give it 50 steps
    """A grown trie whose selectors were trained to spread traffic over every choice (stop included)."""
    net = grown_trie(backbone, selector=selector, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for n in net.nodes() if n.selector for p in n.selector.parameters()], 3e-2)
    net.train()
    for _ in range(steps):
        _, record = net(varied_batch(32, gen), return_record=True)
        opt.zero_grad()
        spread_loss(record).backward()
        opt.step()
    return net.eval()


def train_step(net, opt, x, y):
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def write_image_folder(root, n_per_class=6, classes=3, size=32, bad=None):
    for split in ("train", "test"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d)
            for i in range(n_per_class):
                side = bad if (bad and split == "train" and c == 0 and i == 0) else size
                arr = np.full((side, side, 3), 40 * c + 3 * i, dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"{i}.png"))
    return root


def cifar_args(out, *extra):
    import train_cifar

    return train_cifar.parse_args(["--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                   "--quiet", *extra])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def tiny_backbone(num_classes=4) -> Backbone:
    """A real `Backbone` (what measure.py and exits.costs read) of four small conv stages."""
    widths = (8, 12, 16, 24)

    def build():
        model = nn.Module()
        chans = (3, *widths)
        model.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(i, o, 3, 1 if k == 0 else 2, 1), nn.BatchNorm2d(o),
                                                   nn.ReLU()) for k, (i, o) in enumerate(zip(chans, widths)))
        model.fc = nn.Linear(widths[-1], num_classes)
        return model

    def cut(model):
        return list(model.stages)

    stages = [Stage(make=lambda i=i: cut(build())[i], channels=c, sig_name="0", sig_dim=c)
              for i, c in enumerate(widths)]
    return Backbone("tiny", num_classes, stages, build, cut, lambda m: m.fc)
