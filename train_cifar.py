"""train_cifar.py: the paper's CIFAR-10 protocol (§5.1, Table 2), end to end, for Juliet or its static backbone.

    python train_cifar.py --backbone densenet121 --epochs 60             # Juliet-DenseNet-121 on CIFAR-10
    python train_cifar.py --backbone resnet18 --static --download        # the static baseline (fetches CIFAR-10)
    python train_cifar.py --dataset synthetic --epochs 8                 # offline: the built-in synthetic set
    python train_cifar.py --resume runs/resnet18-juliet-20261124-101500  # continue an interrupted run

Every epoch: train_one_epoch (growth, Alg. 2, every --grow-every mini-batches), evaluate on the 10%
validation split, end_epoch (pruning sweep, Alg. 3, every --prune-every epochs), ReduceLROnPlateau on
the validation loss, one log line, epoch_<k>.json, and checkpoint.pt (written atomically). At the end:
the test set, final.json and the plots. A run directory (DESIGN §6) is never overwritten.

FLOPs are reported two ways (DESIGN §4): `*_paper_convention_macs` is THOP on one dummy input (what the
paper calls FLOPs; for Juliet it follows one path), `*_executed_macs*` is what the routed samples ran.
"""

import argparse
import json
import math
import os
import profile as jprofile  # Juliet's profile.py (a superset of the stdlib module of that name)
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from backbones import BACKBONES, make_backbone, static_model
from grow_prune import MODES, GrowPruneConfig, end_epoch, grow
from routers import SELECTORS
from trie import POLICIES, JulietNet, gumbel_tau


class UsageError(Exception):
    """Bad input: main() prints this one line and exits with status 2, touching nothing on disk."""


# ----------------------------------------------------------------------------- data (DESIGN §5)


class SyntheticImages(Dataset):
    """A seeded, procedurally generated 10-class 32x32 image set: learnable, offline, easy and hard samples.

    Class c is an ordered pair of textures (top half, bottom half) from {horizontal stripes, vertical
    stripes, rings, checkerboard, diagonal cross}; classes come in swapped pairs, (a, b) and (b, a).
    Easy samples (1 - hard_fraction) are drawn in their class's own colour with little noise, so the
    stem's features give the class away. Hard samples get a random colour, lower contrast and more noise:
    only the spatial arrangement of the two textures separates a class from its partner, which needs the
    larger receptive fields of deeper stages (a linear exit on ResNet-18's stem gets ~99% of the easy and
    ~45% of the hard ones). Routing thus has something to specialise on. Every class is invariant to
    Table 2's crops and horizontal flips. `hard` records which sample is which.
    """

    PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2), (4, 0), (0, 4), (1, 2), (2, 1), (3, 4), (4, 3))

    def __init__(self, n: int, seed: int, size: int = 32, hard_fraction: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (n,), generator=g)
        self.hard = torch.rand(n, generator=g) < hard_fraction
        palette = 0.2 + 0.8 * torch.rand(10, 3, generator=torch.Generator().manual_seed(1234))
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")

        def texture(kind):  # (n,) texture ids -> (n, S, S), random period, phase and ring centre
            f = 2 * math.pi / (3.5 + 2.5 * torch.rand(n, 1, 1, generator=g))
            p = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
            cx, cy = size * torch.rand(n, 1, 1, generator=g), size * torch.rand(n, 1, 1, generator=g)
            u, v = (xx + yy) / math.sqrt(2), (xx - yy) / math.sqrt(2)
            waves = torch.stack([torch.sin(f * yy + p), torch.sin(f * xx + p),
                                 torch.sin(f * torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + p),
                                 torch.sin(f * xx + p) * torch.sin(f * yy + p),
                                 (torch.sin(f * u + p) + torch.sin(f * v + p)) / 2], 1)  # (n, 5, S, S)
            return waves[torch.arange(n), kind]

        pairs = torch.tensor(self.PAIRS)[y]  # (n, 2)
        split = torch.randint(12, 21, (n, 1, 1), generator=g)  # the row where the bottom texture starts
        wave = torch.where(yy < split, texture(pairs[:, 0]), texture(pairs[:, 1]))  # (n, S, S)
        amp = torch.where(self.hard, 0.35, 0.6)[:, None, None]
        colour = torch.where(self.hard[:, None], 0.2 + 0.8 * torch.rand(n, 3, generator=g), palette[y])  # (n, 3)
        noise = torch.where(self.hard, 0.25, 0.08)[:, None, None, None] * torch.randn(n, size, size, 3, generator=g)
        img = 0.5 + (amp * wave)[..., None] * colour[:, None, None, :] + noise  # (n, S, S, 3)
        self.data = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.targets = y.tolist()
        self.classes = [f"{a}-over-{b}" for a, b in self.PAIRS]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i]), self.targets[i]


class Split(Dataset):
    """Some indices of a dataset, with their own transform (train augmentation vs. evaluation)."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, y = self.base[self.indices[i]]
        return self.transform(img), y


STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")


def cifar_transform(dataset: str, size: int, train: bool):
    """Table 2: random crop 32 with padding 4, horizontal flip, normalisation."""
    mean, std = STATS.get(dataset, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    aug = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)])


def check_image_folder(root: str, size: int):
    """An ImageFolder split, every image checked to be size x size (headers only: fast)."""
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root} does not exist (expected <data-dir>/train and <data-dir>/test "
                         f"with one sub-folder of images per class)")
    try:
        ds = torchvision.datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"image folder {root}: {e}") from None
    for path, _ in tqdm(ds.samples, desc=f"checking {root}", leave=False, disable=len(ds) < 5000):
        with Image.open(path) as im:
            if im.size != (size, size):
                raise UsageError(f"{path} is {im.size[0]}x{im.size[1]}, expected {size}x{size} (--input-size)")
    return ds


def load_base(config: dict, train: bool):
    """The raw train or test split of the configured dataset, through torchvision's own loaders."""
    name, root = config["dataset"], config["data_dir"]
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            return cls(root, train=train, download=config.get("download", False))
        except RuntimeError:
            raise UsageError(f"{name} not found in {root}; fetch it with: python train_cifar.py --dataset {name} "
                             f"--data-dir {root} --download") from None
    if name == "imagefolder":
        return check_image_folder(os.path.join(root, "train" if train else "test"), config["input_size"])
    n = config["synthetic_size"] if train else max(1, config["synthetic_size"] // 5)
    return SyntheticImages(n, seed=config["data_seed"] + (0 if train else 1))


def make_datasets(config: dict):
    """Train / val (a seeded 90/10 split of the training set, Table 2) / test datasets."""
    base = load_base(config, train=True)
    perm = torch.randperm(len(base), generator=torch.Generator().manual_seed(config["split_seed"])).tolist()
    n_val = int(round(len(base) * config["val_split"]))
    size, name = config["input_size"], config["dataset"]
    train = Split(base, perm[n_val:], cifar_transform(name, size, train=True))
    val = Split(base, perm[:n_val], cifar_transform(name, size, train=False))
    return train, val, make_test_set(config), len(base.classes)


def make_test_set(config: dict):
    base = load_base(config, train=False)
    return Split(base, range(len(base)), cifar_transform(config["dataset"], config["input_size"], train=False))


def make_test_loader(config: dict) -> DataLoader:
    """The test loader of a run, from its config.json (used by `profile.py runs/<name>`)."""
    if config["dataset"] == "imagenet":
        import train_imagenet  # the ImageNet protocol lives there (and imports this module)

        return loader(train_imagenet.val_set(config), config, shuffle=False)
    return loader(make_test_set(config), config, shuffle=False)


# ----------------------------------------------------------------------------- model and one epoch


def build_model(args, num_classes: int):
    if args.static:
        return static_model(args.backbone, num_classes)
    try:  # the library names the bad parameter in a ValueError: one line for the user
        return JulietNet(make_backbone(args.backbone, num_classes), router=args.router, policy=args.policy,
                         prebuild=args.prebuild, stop=not args.no_stop, stop_bias=args.stop_bias,
                         d_model=args.d_model, n_head=args.n_head, beta=args.ema_beta)
    except ValueError as e:
        raise UsageError(str(e)) from None


def freeze_routing(model, frozen: bool) -> None:
    """Routing warm-up (ours): frozen selectors keep a new trie at full depth (negative stop bias), so the
    stages and exits learn before the straight-through signal, noise until then, can move any route."""
    for node in model.nodes():
        if node.selector is not None:
            node.selector.requires_grad_(not frozen)


def grow_prune_config(args) -> GrowPruneConfig:
    return GrowPruneConfig(mode=args.grow_prune, theta_grow=args.grow_threshold, theta_prune=args.prune_threshold,
                           grow_every=args.grow_every, prune_every=args.prune_every, t_min=args.t_min,
                           m_max=args.m_max, max_depth=args.max_depth)


def train_one_epoch(model, loader, opt, scaler, args, run: dict) -> dict:
    """One pass over the training split, with growth (Alg. 2) after each mini-batch for a Juliet model."""
    juliet, device = isinstance(model, JulietNet), device_of(model)
    cfg, costs, meter = grow_prune_config(args), PathCosts(model, args.input_size), Meter()
    events = []
    model.train()
    for x, y in tqdm(loader, desc=f"epoch {run['epoch']} train", leave=False, disable=args.quiet):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if juliet and args.cost_weight:  # compute-aware routing (DESIGN §3, twin of §6.2)
                loss = loss + args.cost_weight * model.cost_loss()
            if juliet and args.balance_weight:  # §2.2 load balancing
                loss = loss + args.balance_weight * model.balance_loss()
            if juliet and args.exit_weight:  # deep supervision of the early exits
                loss = loss + args.exit_weight * model.exit_loss(y)
            if juliet and args.route_weight:  # stop decisions on their expected loss
                loss = loss + args.route_weight * model.route_loss(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {run['epoch']}, step {run['step'] + 1}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        run["step"] += 1
        meter.add(logits, y, loss)
        if juliet:
            costs.add(model.last_leaf_counts)
            new = grow(model, cfg, run["step"], opt)
            if new:
                events += [dict(e, epoch=run["epoch"]) for e in new]
                costs.changed()
                freeze_routing(model, run["epoch"] <= args.route_warmup)
                maybe_compile(model, args)
        if args.limit_batches and meter.batches >= args.limit_batches:
            break
    out = meter.result("train")
    if juliet:
        out.update(train_executed_macs_per_sample=costs.per_sample(), train_node_visits=dict(model.visits))
    return out | {"events": events}


@torch.no_grad()
def evaluate(model, loader, args, split: str) -> dict:
    """Loss, top-1/5; for Juliet also per-leaf counts, node visits and per-node throughput (img/s)."""
    juliet, device, meter = isinstance(model, JulietNet), device_of(model), Meter()
    leaves, depth_sum, class_n = Counter(), Counter(), Counter()
    model.eval()
    if juliet:
        model.visits.clear(), model.node_seconds.clear()
        model.time_nodes = True
    for x, y in tqdm(loader, desc=split, leave=False, disable=args.quiet):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            logits, paths = model(x, return_paths=True) if juliet else (model(x), None)
        meter.add(logits, y, F.cross_entropy(logits.float(), y))
        if juliet:  # executed nodes and per-class traversal depth (§5.2 "Metrics")
            leaves.update(model.last_leaf_counts)
            depth = {leaf: model.node(leaf).depth for leaf in model.last_leaf_counts}
            for c, leaf in zip(y.tolist(), paths):
                depth_sum[c] += depth[leaf]
                class_n[c] += 1
        if args.limit_batches and meter.batches >= args.limit_batches:
            break
    out = meter.result(split)
    if juliet:
        model.time_nodes = False
        out[f"{split}_leaf_counts"] = dict(leaves)
        out[f"{split}_class_depth"] = {c: depth_sum[c] / n for c, n in class_n.items()}
        out[f"{split}_node_visits"] = dict(model.visits)
        out[f"{split}_node_throughput_img_s"] = {k: round(model.visits[k] / s, 1)
                                                 for k, s in model.node_seconds.items() if s > 0}
        macs = jprofile.expected_macs(model, dict(leaves), args.input_size)
        out[f"{split}_executed_macs_per_sample"] = macs["expected_macs_per_sample"]
    return out


def fit(model, data, args, run: dict, state: dict, on_epoch=None) -> None:
    """The epoch loop of §5.1: train, validate, prune (Alg. 3), step the scheduler, log, checkpoint."""
    train_loader, val_loader = data
    opt, sched, scaler = state["optimizer"], state["scheduler"], state["scaler"]
    juliet = isinstance(model, JulietNet)
    for epoch in tqdm(range(run["epoch"] + 1, args.epochs + 1), desc="epochs", disable=args.quiet):
        run["epoch"] = epoch
        seed_epoch(args.seed, epoch, train_loader)  # same data order and draws with or without --resume
        if juliet:
            model.visits.clear()
            model.tau = gumbel_tau(epoch - 1, args.epochs, args.tau0, args.tau_min)
            freeze_routing(model, epoch <= args.route_warmup)
        t0 = time.perf_counter()
        with jprofile.EnergyMeter() as e_train:
            log = train_one_epoch(model, train_loader, opt, scaler, args, run)
        with jprofile.EnergyMeter() as e_val:
            log |= evaluate(model, val_loader, args, "val")
        if juliet:
            prune_events = end_epoch(model, grow_prune_config(args), epoch, run["step"], opt)
            log["events"] += [dict(e, epoch=epoch) for e in prune_events]
            if prune_events:
                maybe_compile(model, args)
        step_scheduler(sched, log["val_loss"])
        log |= epoch_record(model, args, run, opt, log, e_train, e_val, time.perf_counter() - t0)
        run["best_val_top1"] = max(run["best_val_top1"], log["val_top1"])
        run["history"].append(log)
        write_epoch(args.out, log, args.quiet)
        save_checkpoint(args.out, model, state, run, args)
        if on_epoch is not None:  # e.g. sweep.py's pruner; may raise to stop the run after a saved epoch
            on_epoch(log)


# ----------------------------------------------------------------------------- run machinery (shared with ImageNet)


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: stop, keeping the last good checkpoint."""


class Meter:
    """Sums of loss and top-1/top-5 hits over an epoch."""

    def __init__(self):
        self.loss = self.top1 = self.top5 = self.n = self.batches = 0
        self.t0 = time.perf_counter()

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hit = top == y[:, None]
        self.loss += float(loss.detach()) * len(y)
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(1).sum())
        self.n, self.batches = self.n + len(y), self.batches + 1

    def result(self, split: str) -> dict:
        n, secs = max(1, self.n), time.perf_counter() - self.t0
        return {f"{split}_loss": self.loss / n, f"{split}_top1": 100 * self.top1 / n,
                f"{split}_top5": 100 * self.top5 / n,
                f"{split}_samples": self.n, f"time_{split}_s": secs, f"throughput_{split}_img_s": self.n / secs}


class PathCosts:
    """Executed MACs of training batches: each leaf's path cost (profile.path_macs), cached until the trie changes."""

    def __init__(self, model, input_size: int):
        self.model, self.size, self.cache, self.macs, self.n = model, input_size, {}, 0.0, 0

    def add(self, leaf_counts: dict) -> None:
        for leaf, n in leaf_counts.items():
            if leaf not in self.cache:
                self.cache[leaf] = jprofile.path_macs(self.model, leaf, self.size)
            self.macs, self.n = self.macs + n * self.cache[leaf], self.n + n

    def changed(self) -> None:
        self.cache.clear()

    def per_sample(self) -> float:
        return self.macs / max(1, self.n)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, loader: DataLoader) -> None:
    """Reseed everything from (seed, epoch): shuffling, augmentation, Gumbel noise and grown weights then
    do not depend on whether the process was restarted, which makes --resume exact."""
    s = seed * 100_003 + epoch
    seed_all(s)
    loader.generator.manual_seed(s)


def loader(dataset, config: dict, shuffle: bool) -> DataLoader:
    """Non-persistent workers get their seeds from the (reseeded) generator every epoch."""
    return DataLoader(dataset, batch_size=config["batch_size"], shuffle=shuffle, drop_last=shuffle,
                      num_workers=config["workers"], pin_memory=config["device"].startswith("cuda"),
                      generator=torch.Generator() if shuffle else None)


def maybe_compile(model, args) -> None:
    """torch.compile each stage in place (state_dict keys unchanged, no `_orig_mod.`), new nodes included."""
    if not args.compile:
        return
    modules = [n.sub for n in model.nodes()] if isinstance(model, JulietNet) else [model]
    for m in modules:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=True)


def make_optim(args, model):
    params = model.parameters()  # one group: grown parameters join it (grow_prune.sync_optimizer)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    if args.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=args.lr_factor,
                                                           patience=args.lr_patience)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.t_max)
    return opt, sched


def step_scheduler(sched, val_loss: float) -> None:
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(val_loss)
    else:
        sched.step()


def write_json(path: str, obj) -> None:
    """Write then rename: a crash never leaves a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def save_checkpoint(out: str, model, state: dict, run: dict, args) -> None:
    ckpt = {"model": model.state_dict(), "structure": model.structure() if isinstance(model, JulietNet) else None,
            "optimizer": state["optimizer"].state_dict(), "scheduler": state["scheduler"].state_dict(),
            "scaler": state["scaler"].state_dict(), "run": run, "args": vars(args),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    path = os.path.join(out, "checkpoint.pt")
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def epoch_record(model, args, run, opt, log, e_train, e_val, seconds: float) -> dict:
    """The per-epoch fields of §5.3 "Profiling outputs" beyond loss and accuracy."""
    macs, _ = jprofile.paper_macs(model, args.input_size)
    n_train = run["train_size"]
    rec = {"epoch": run["epoch"], "step": run["step"], "lr": opt.param_groups[0]["lr"], "time_epoch_s": seconds,
           "params": jprofile.total_params(model), "flops_paper_convention_macs": macs,
           # §5.1: training FLOPs/epoch ~ 3 x inference FLOPs x |D_train| (THOP MACs, one dummy input)
           "train_flops_epoch_paper_convention_macs": 3 * macs * n_train,
           "peak_memory_bytes": peak_memory_bytes(args.device)}
    rec |= {k.replace("energy", "energy_train"): v for k, v in e_train.as_dict(log["train_samples"]).items()}
    rec |= {k.replace("energy", "energy_val"): v for k, v in e_val.as_dict(log["val_samples"]).items()}
    if isinstance(model, JulietNet):
        # the honest twin: 3 x the MACs the routed training samples actually executed
        rec["train_flops_epoch_executed_macs"] = 3 * log["train_executed_macs_per_sample"] * n_train
        rec["n_nodes"] = sum(1 for _ in model.nodes())
        rec["structure"] = model.structure()["root"]
    return rec


def peak_memory_bytes(device: str) -> int:
    """DESIGN §4: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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


def plot_run(out: str, history: list, model, final: dict) -> None:
    """accuracy.png (Fig. 2 style curves); for Juliet also node_usage.png and trie.png (test traffic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    draw_trie(ax, model, {k: v / n for k, v in visits.items()}, plt)
    fig.tight_layout(), fig.savefig(os.path.join(out, "trie.png"), dpi=120), plt.close(fig)


def draw_trie(ax, model, share: dict, plt) -> None:
    """Leaves left to right, parents centred over their children; size and colour show the traffic share."""
    pos, next_x = {}, iter(range(10**6))

    def place(node, level):
        xs = [place(k, level + 1) for k in node.kids]
        pos[node.node_id] = (sum(xs) / len(xs) if xs else next(next_x), -level)
        return pos[node.node_id][0]

    place(model.root, 0)
    for node in model.nodes():
        for k in node.kids:
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


def final_eval(model, test_loader, args, run: dict) -> dict:
    """Test-set numbers for final.json: both FLOP conventions, side by side and named for what they are."""
    res = evaluate(model, test_loader, args, "test")
    macs, _ = jprofile.paper_macs(model, args.input_size)
    final = {k: v for k, v in res.items() if not k.startswith("test_node_throughput")}
    final |= {"flops_paper_convention_macs": macs, "params": jprofile.total_params(model), "epochs": run["epoch"],
              "best_val_top1": run["best_val_top1"], "train_size": run["train_size"]}
    if isinstance(model, JulietNet):
        exp = jprofile.expected_macs(model, res["test_leaf_counts"], args.input_size)
        final |= {"test_paths": exp["paths"],
                  "executed_params": jprofile.executed_params(model, res["test_leaf_counts"])}
    else:  # a static model executes everything for every sample
        final["test_executed_macs_per_sample"] = macs
    return final


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
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.amp and not args.device.startswith("cuda"):
        tqdm.write("note: --amp is ignored on CPU (no autocast on CPU)")
        args.amp = False
    if args.device.startswith("cuda"):  # Table 3: TF32 when available
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def run(args, make_datasets, build_model, on_epoch=None) -> dict:
    """Everything around the epoch loop: data, model, optimiser, run directory, resume, test, plots."""
    t_start = time.perf_counter()
    args, ckpt = open_run(args)
    setup_device(args)
    try:
        grow_prune_config(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = vars(args)
    train_ds, val_ds, test_ds, num_classes = make_datasets(config)
    if len(train_ds) < args.batch_size:
        raise UsageError(f"the training split has {len(train_ds)} images, fewer than --batch-size {args.batch_size}")
    config = config | {"num_classes": num_classes, "train_size": len(train_ds), "val_size": len(val_ds),
               "test_size": len(test_ds), "torch": torch.__version__}
    seed_all(args.seed)
    if ckpt is None:
        make_run_dir(args.out)
    if ckpt and ckpt["structure"] is not None:  # resume: rebuild the grown trie first (STYLE 12)
        model = JulietNet.from_structure(ckpt["structure"])
    else:
        model = build_model(args, num_classes)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(args.device)
    maybe_compile(model, args)
    opt, sched = make_optim(args, model)
    scaler = torch.amp.GradScaler(enabled=args.amp)
    state = {"optimizer": opt, "scheduler": sched, "scaler": scaler}
    run_state = {"epoch": 0, "step": 0, "best_val_top1": 0.0, "history": [], "train_size": len(train_ds)}
    if ckpt:
        for k in state:
            state[k].load_state_dict(ckpt[k])
        run_state = ckpt["run"]
    else:
        write_json(os.path.join(args.out, "config.json"), config)
    profile = jprofile.model_profile(model, args.dataset, args.input_size, num_classes)
    write_json(os.path.join(args.out, "model_profile.json"), profile)
    variant = "static" if args.static else "juliet"
    tqdm.write(f"{args.out}: {variant}-{args.backbone} params={profile['params'] / 1e6:.2f}M "
               f"paper-convention MACs (one dummy input)={profile['flops_paper_convention_macs'] / 1e6:.2f}M; "
               f"expected executed MACs per sample are measured on val every epoch")
    if not args.eval_only:
        data = (loader(train_ds, config, shuffle=True), loader(val_ds, config, shuffle=False))
        fit(model, data, args, run_state, state, on_epoch)
    final = final_eval(model, loader(test_ds, config, shuffle=False), args, run_state)
    final["wall_time_s"], final["run_dir"] = time.perf_counter() - t_start, args.out
    write_json(os.path.join(args.out, "final.json"), final)
    plot_run(args.out, run_state["history"], model, final)
    tqdm.write(f"test_top1={final['test_top1']:.2f} test_top5={final['test_top5']:.2f} "
               f"paper_MMACs={final['flops_paper_convention_macs'] / 1e6:.2f} "
               f"exec_MMACs={final['test_executed_macs_per_sample'] / 1e6:.2f} params={final['params'] / 1e6:.2f}M")
    return final


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def unit_interval(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="run directory (default: runs/<backbone>-<variant>-<time>)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--eval-only", action="store_true", help="only evaluate the checkpoint of --resume DIR on test")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (§5.3 software stack)")
    g.add_argument("--compile", action="store_true", help="torch.compile every stage (§5.3 software stack)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on CUDA)")
    g.add_argument("--limit-batches", type=int, default=0, help="stop each pass after N batches (smoke tests)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def finish_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    args.explicit = [a.dest for a in p._actions if flags & set(a.option_strings)]
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


# ----------------------------------------------------------------------------- command line


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every flag, with Table 2 (CIFAR-10) defaults; train_imagenet.py swaps in Table 3's."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet18", choices=BACKBONES, help="§5.1 backbones")
    g.add_argument("--static", action="store_true", help="train the unmodified torchvision baseline (Table 4)")
    g.add_argument("--router", default="transformer", choices=list(SELECTORS), help="path selector (§4.1; §5.3)")
    g.add_argument("--policy", default="top1", choices=POLICIES, help="routing policy (§4.1 top-1; §5.3 gumbel)")
    g.add_argument("--tau0", type=float, default=1.0, help="gumbel: initial temperature (§3.1.3 annealing)")
    g.add_argument("--tau-min", type=float, default=0.1, help="gumbel: final temperature")
    g.add_argument("--prebuild", type=int, default=None,
                   help="nodes in the initial chain; default one per stage (§5.3 'Initialisation': 5, or 10 "
                        "for ResNet-101)")
    g.add_argument("--no-stop", action="store_true", help="no stop children: every path runs every stage")
    g.add_argument("--d-model", type=int, default=64, help="selector width d_model (§4.1)")
    g.add_argument("--n-head", type=int, default=4, help="selector heads n_head (§4.1)")
    g.add_argument("--ema-beta", type=float, default=0.99, help="EMA beta of alpha and sigma^2 (Eq. 3; lambda=1-beta)")
    g = p.add_argument_group("routing recipe (ours; README 'Paper notes and deviations')")
    g.add_argument("--stop-bias", type=float, default=-2.0,
                   help="initial stop-logit offset: negative starts at full depth, exits are learned")
    g.add_argument("--cost-weight", type=float, default=0.2,
                   help="lambda_c of the compute-aware routing loss (DESIGN §3; training twin of §6.2; ours)")
    g.add_argument("--balance-weight", type=float, default=0.0, help="weight of the §2.2 load-balancing loss")
    g.add_argument("--route-warmup", type=int, default=2,
                   help="epochs with frozen selectors before routing is learned (ours)")
    g.add_argument("--route-weight", type=float, default=1.0,
                   help="weight of the expected-loss training of stop decisions (ours; JulietNet.route_loss)")
    g.add_argument("--exit-weight", type=float, default=1.0,
                   help="weight of the deep supervision of early exits (ours; trie.JulietNet.exit_loss)")
    g = p.add_argument_group("growth and pruning (§3.1.1, Alg. 2-3)")
    g.add_argument("--grow-prune", default="both", choices=MODES, help="§5.3 ablation modes")
    g.add_argument("--grow-threshold", type=unit_interval, default=0.4,
                   help="theta_grow (Table 2: 0.4; Table 3: 0.5)")
    g.add_argument("--prune-threshold", type=unit_interval, default=0.1, help="theta_prune (Tables 2 and 3)")
    g.add_argument("--grow-every", type=positive, default=10,
                   help="mini-batches between growth attempts (Table 3; Table 2 gives none)")
    g.add_argument("--prune-every", type=positive, default=3,
                   help="E_prune, epochs (Table 2: every 3 ep; Table 3: 5)")
    g.add_argument("--t-min", type=positive, default=3, help="epochs of alpha < theta_prune before pruning")
    g.add_argument("--m-max", type=positive, default=3, help="M_max stage children per node (Alg. 2)")
    g.add_argument("--max-depth", type=int, default=None, help="deepest node depth (default: last stage)")
    g = p.add_argument_group("data (§5.1, Table 2)")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS)
    g.add_argument("--data-dir", default="./data", help="CIFAR root, or an image folder with train/ and test/")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument("--input-size", type=int, default=32, help="image side (CIFAR: 32)")
    g.add_argument("--synthetic-size", type=positive, default=10000, help="synthetic train+val images")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images")
    g.add_argument("--val-split", type=float, default=0.1, help="Table 2: 90/10 train/val split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")
    g = p.add_argument_group("optimisation (Table 2 for CIFAR-10, Table 3 for ImageNet)")
    g.add_argument("--epochs", type=positive, default=60, help="Table 2: 15, 30 or 60; §6.3: 120")
    g.add_argument("--batch-size", type=positive, default=128, help="Table 2: 128; Table 3: 256")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="Table 2: Adam; Table 3: SGD")
    g.add_argument("--lr", type=float, default=1e-3, help="Table 2: 1e-3; Table 3: 0.1")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD only (Table 3: 0.9)")
    g.add_argument("--wd", type=float, default=1e-5, help="weight decay (Table 2: 1e-5; Table 3: 1e-4)")
    g.add_argument("--scheduler", default="plateau", choices=("plateau", "cosine"),
                   help="Table 2: ReduceLROnPlateau on val loss; Table 3: CosineAnnealingLR")
    g.add_argument("--lr-factor", type=float, default=0.5, help="plateau factor (Table 2)")
    g.add_argument("--lr-patience", type=int, default=3, help="plateau patience (Table 2)")
    g.add_argument("--t-max", type=int, default=40, help="cosine T_max (Table 3)")
    add_run_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return finish_args(build_parser(__doc__.split("\n")[0]), argv)


def main(args: argparse.Namespace, on_epoch=None) -> dict:
    """Train (or resume, or only evaluate) and return final.json's content; `on_epoch(log)` after each epoch."""
    return run(args, make_datasets, build_model, on_epoch)


if __name__ == "__main__":
    cli(main, parse_args)
