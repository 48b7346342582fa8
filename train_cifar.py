"""train_cifar.py: the paper's CIFAR-10 protocol (§5.1, Table 2), end to end, for Juliet or its
static backbone.

    python train_cifar.py --backbone densenet121 --epochs 60      # Juliet-DenseNet-121, CIFAR-10
    python train_cifar.py --backbone resnet18 --static            # the static baseline
    python train_cifar.py --dataset synthetic --epochs 8          # offline: the synthetic set
    python train_cifar.py --recipe paper                          # the paper's recipe (recipes.py)
    python train_cifar.py --resume runs/resnet18-juliet-20261124-101500  # continue a run
    torchrun --standalone --nproc_per_node 2 train_cifar.py --threads 1  # data parallel

Every epoch (`fit`): train_one_epoch (growth, Alg. 2, every --grow-every mini-batches), evaluate on
the 10% validation split, end_epoch (the pruning sweep, Alg. 3, every --prune-every epochs),
ReduceLROnPlateau on the validation loss, one log line, epoch_<k>.json and checkpoint.pt. At the
end: the kept model (`keep_and_calibrate`), the test set, final.json (and its median training wall
time per epoch) and the plots. Run directories are never overwritten; bad input fails in one line
before any file is made. FLOPs two ways (README "Results on real images"): paper convention (THOP,
one dummy input) and executed (what the routed samples ran).
"""

import contextlib
import os
import time
from collections import Counter
from statistics import median

import torch
import torch.nn.functional as F
from tqdm import tqdm

import calibrate
import checkpoints
import data
import distributed
import energy
import exits
import measure
import plots
import recipes
import runs
from backbones import make_backbone, static_model
from grow_prune import GrowPruneConfig, end_epoch, grow, prune_unvisited, usage_decay
from losses import gumbel_tau, juliet_loss
from runs import NonFiniteLoss, UsageError
from trie import JulietNet

# ----------------------------------------------------------------------------- model


def grow_prune_config(args) -> GrowPruneConfig:
    try:  # a bad value fails with one line, before any file is made (train_and_test calls it first)
        return GrowPruneConfig(**recipes.library_args(args, GrowPruneConfig))
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_held_out(args, cfg: GrowPruneConfig) -> None:
    """Nothing is kept, pruned, calibrated or scheduled on a test set: where validation is the
    test set (ImageNet with holdout 0, §6.3's protocol), the settings that would fit on it are
    refused."""
    if not data.val_is_test(vars(args)) or args.eval_only:
        return
    fits = [name for name, on in [
        ("--keep best", args.keep == "best"), ("--calibrate", not args.static and args.calibrate),
        ("--set prune_kept=true", not args.static and cfg.prune_kept and cfg.prunes),
        ("--set scheduler=plateau", args.scheduler == "plateau")] if on]
    if fits:
        raise UsageError(f"with holdout 0 the validation set is ImageNet's test set, and "
                         f"{', '.join(fits)} would fit on it: hold out training images "
                         f"(--set holdout=50000) or turn {'it' if len(fits) == 1 else 'them'} off")


def build_model(args, num_classes: int, steps_per_epoch: int):
    if args.static:
        return static_model(args.backbone, num_classes)
    usage_beta = usage_decay(grow_prune_config(args), steps_per_epoch)
    try:  # the library names the bad parameter in a ValueError: one line for the user
        backbone = make_backbone(args.backbone, num_classes)
        settings = recipes.library_args(args, JulietNet, recipes.NET)
        return JulietNet(backbone, usage_beta=usage_beta, **settings)
    except ValueError as e:
        raise UsageError(str(e)) from None


def maybe_compile(model, args) -> None:
    """torch.compile each stage in place (state_dict keys unchanged, no `_orig_mod.`)."""
    if not args.compile:
        return
    for m in [n.sub for n in model.nodes()] if isinstance(model, JulietNet) else [model]:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=True)


def make_optim(args, model):
    """Table 2: Adam + ReduceLROnPlateau(min, 0.5, 3); Table 3: SGD + CosineAnnealingLR(T_max=40).
    One param group: grown parameters join it (grow_prune.sync_optimizer)."""
    params, lr, wd = model.parameters(), args.lr, args.wd
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=wd) if args.optimizer == "adam" else
           torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=wd))
    schedulers = torch.optim.lr_scheduler
    if args.scheduler == "plateau":
        return opt, schedulers.ReduceLROnPlateau(opt, mode="min", factor=args.lr_factor,
                                                 patience=args.lr_patience)
    return opt, schedulers.CosineAnnealingLR(opt, T_max=args.t_max)


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(model, loader, opt, scaler, args, progress: dict) -> dict:
    """One pass over the training split, with growth (Alg. 2) after each mini-batch for Juliet."""
    juliet, device = isinstance(model, JulietNet), measure.device_of(model)
    cfg, weights = grow_prune_config(args), recipes.library_args(args, juliet_loss)
    costs, meter = measure.PathCosts(model, args.input_size), runs.Meter()
    events, visits = [], Counter()
    model.train()
    ddp = distributed.wrap(model)  # torchrun: DistributedDataParallel over today's trie
    bar = tqdm(loader, desc=f"epoch {progress['epoch']} train", leave=False, disable=args.quiet)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            if juliet:  # the forward pass returns what it did; the losses read it
                logits, record = ddp(x, return_record=True)
                loss = juliet_loss(model, record, logits, y, **weights)
            else:
                logits = ddp(x)
                loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {progress['epoch']}, "
                                f"step {progress['step'] + 1}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # torchrun: DDP averages the gradients during backward
        counts = distributed.sync_step(model, record.leaf_counts if juliet else {})  # alpha, BN
        scaler.step(opt)
        scaler.update()
        progress["step"] += 1
        meter.add(logits, y, loss)
        if juliet:
            costs.add(record.ran_leaf_counts)  # what ran: in full-depth training, whole paths
            visits.update(measure.node_visits(model, record.ran_leaf_counts))
            new = grow(model, cfg, progress["step"], counts, opt)
            if new:
                distributed.broadcast_model(model)  # the new child: rank 0's weights on every rank
                events += [dict(e, epoch=progress["epoch"]) for e in new]
                costs.changed()
                maybe_compile(model, args)
                ddp = distributed.wrap(model)  # a new parameter list: DDP is rebuilt over it
        if args.limit_batches and meter.batches >= args.limit_batches:
            break
    out = meter.result("train")
    if juliet:
        out.update(train_executed_macs_per_sample=costs.per_sample(),
                   train_node_visits=dict(visits))
    return out | {"events": events}


@torch.no_grad()
def evaluate(model, loader, args, part: str) -> dict:
    """Loss and top-1/5 on a part (val, test); for Juliet also per-leaf counts, node visits,
    per-class depth (§5.2 "Metrics") and per-node throughput (img/s)."""
    juliet, device, meter = isinstance(model, JulietNet), measure.device_of(model), runs.Meter()
    leaves, depth_sum, class_n = Counter(), Counter(), Counter()
    model.eval()
    with measure.node_timer(model) if juliet else contextlib.nullcontext({}) as seconds:
        for x, y in tqdm(loader, desc=part, leave=False, disable=args.quiet):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=args.amp):
                logits, paths = model(x, return_paths=True) if juliet else (model(x), None)
            meter.add(logits, y, F.cross_entropy(logits.float(), y))
            if juliet:
                n = Counter(paths)
                leaves.update({leaf.node_id: n[leaf.node_id] for leaf in model.leaves()
                               if leaf.node_id in n})  # pre-order
                depth = {leaf: model.node(leaf).depth for leaf in n}
                for c, leaf in zip(y.tolist(), paths):
                    depth_sum[c] += depth[leaf]
                    class_n[c] += 1
            if args.limit_batches and meter.batches >= args.limit_batches:
                break
    out = meter.result(part)
    if juliet:
        visits = measure.node_visits(model, leaves)
        out |= {f"{part}_leaf_counts": dict(leaves), f"{part}_class_samples": dict(class_n),
                f"{part}_class_depth": {c: depth_sum[c] / n for c, n in class_n.items()},
                f"{part}_node_visits": dict(visits),
                f"{part}_node_throughput_img_s": {k: round(visits[k] / s, 1)
                                                  for k, s in seconds.items() if s > 0},
                f"{part}_executed_macs_per_sample": measure.expected_macs(
                    model, dict(leaves), args.input_size)["expected_macs_per_sample"]}
    return out


def fit(model, loaders, args, progress: dict, state: dict, on_epoch=None) -> None:
    """§5.1's epoch loop: train, validate, prune (Alg. 3), step the scheduler, log, checkpoint."""
    train_loader, val_loader = loaders
    opt, sched = state["optimizer"], state["scheduler"]
    juliet, gpu = isinstance(model, JulietNet), energy.nvml_index(args.device)
    epochs = range(progress["epoch"] + 1, args.epochs + 1)
    for epoch in tqdm(epochs, desc="epochs", disable=args.quiet):
        progress["epoch"] = epoch
        distributed.seed_epoch(args.seed, epoch, train_loader)  # the same draws after --resume
        if juliet:
            model.tau = gumbel_tau(epoch - 1, args.epochs, args.tau0, args.tau_min)
        t0 = time.perf_counter()
        with energy.EnergyMeter(gpu) as e_train:
            log = train_one_epoch(model, train_loader, opt, state["scaler"], args, progress)
        with energy.EnergyMeter(gpu) as e_val:
            log |= evaluate(model, val_loader, args, "val")
        if juliet:  # the kept checkpoint's score: routing is fitted afterwards (keep_and_calibrate)
            log["val_full_depth_top1"] = exits.full_depth_top1(model, val_loader, args.device)
        log = distributed.reduce_log(log)  # torchrun: each rank saw its own part of the data
        if juliet:
            log |= end_of_epoch(model, args, log, progress, opt)
        plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
        sched.step(log["val_loss"]) if plateau else sched.step()
        log |= distributed.reduce_log(epoch_record(model, args, progress, opt, log, e_train, e_val,
                                                   time.perf_counter() - t0))
        score = log.get("val_full_depth_top1", log["val_top1"])
        best = score >= progress.get("best_score", -1.0)  # model_best; ties go to the later epoch
        if best:
            progress["best_score"], progress["best_epoch"] = score, epoch
        progress["best_val_top1"] = max(progress["best_val_top1"], log["val_top1"])
        progress["history"].append(log)
        if distributed.is_main():
            runs.write_epoch(args.out, log, args.quiet)
            if best:
                checkpoints.save_model(args.out, model, epoch)
            checkpoints.save_checkpoint(args.out, model, state, progress, args)
        if on_epoch is not None:  # e.g. sweep.py's pruner; may raise to stop after a saved epoch
            on_epoch(log)


def end_of_epoch(model, args, log: dict, progress: dict, opt) -> dict:
    """A trie's epoch end: a collapse warning, and Alg. 3's ageing and sweep."""
    warning = exits.collapse_message(log["val_leaf_counts"], len(model.leaves()))
    if warning and not args.calibrate:  # else the stop rule is untuned: calibrate_net warns
        tqdm.write(f"warning: epoch {progress['epoch']}: {warning}")
    pruned = end_epoch(model, grow_prune_config(args), progress["epoch"], progress["step"], opt)
    if pruned:
        maybe_compile(model, args)
    return {"routing_collapsed": warning is not None,
            "events": log["events"] + [dict(e, epoch=progress["epoch"]) for e in pruned]}


def epoch_record(model, args, progress, opt, log, e_train, e_val, seconds: float) -> dict:
    """The per-epoch fields of §5.3 "Profiling outputs" beyond loss and accuracy."""
    macs, _ = measure.paper_macs(model, args.input_size)
    n_train = progress["train_size"]
    rec = {"epoch": progress["epoch"], "step": progress["step"], "lr": opt.param_groups[0]["lr"],
           "time_epoch_s": seconds, "params": measure.total_params(model),
           "flops_paper_convention_macs": macs,
           # §5.1: training FLOPs/epoch ~ 3 x inference FLOPs x |D_train| (THOP, one dummy input)
           "train_flops_epoch_paper_convention_macs": 3 * macs * n_train,
           "peak_memory_bytes": measure.process_peak_bytes(args.device)}
    for part, meter in (("train", e_train), ("val", e_val)):
        rec |= {k.replace("energy", f"energy_{part}"): v
                for k, v in meter.as_dict(log[f"{part}_samples"]).items()}
    if isinstance(model, JulietNet):  # the honest twin: 3 x what the training samples executed
        rec["train_flops_epoch_executed_macs"] = 3 * log["train_executed_macs_per_sample"] * n_train
        rec["n_nodes"] = sum(1 for _ in model.nodes())
        rec["structure"] = model.structure()["root"]
    return rec


def final_eval(model, test_loader, args, progress: dict) -> dict:
    """Test-set numbers for final.json: both FLOP conventions, side by side and named."""
    res = evaluate(model, test_loader, args, "test")
    macs, _ = measure.paper_macs(model, args.input_size)
    final = {k: v for k, v in res.items() if not k.startswith("test_node_throughput")}
    final |= {"flops_paper_convention_macs": macs, "params": measure.total_params(model),
              "epochs": progress["epoch"], "best_val_top1": progress["best_val_top1"],
              "train_size": progress["train_size"]}
    hist = progress["history"]  # the median training wall time of an epoch:
    final["time_train_epoch_s"] = median(h["time_train_s"] for h in hist) if hist else None
    # training MACs per epoch (§5.1's 3 x forward): the static backbone's beside Juliet's executed
    # ones, which in full-depth training run exits and selectors on top of every stage
    juliet = isinstance(model, JulietNet)
    static = measure.paper_macs(static_model(args.backbone, model.backbone.num_classes),
                                args.input_size)[0] if juliet else macs
    final["train_flops_epoch_static_macs"] = 3 * static * progress["train_size"]
    if not juliet:  # a static model executes everything for every sample
        return final | {"test_executed_macs_per_sample": macs}
    if hist:
        final["train_flops_epoch_executed_macs"] = hist[-1]["train_flops_epoch_executed_macs"]
    exp = measure.expected_macs(model, res["test_leaf_counts"], args.input_size)
    final |= {"test_paths": exp["paths"],
              "executed_params": measure.executed_params(model, res["test_leaf_counts"])}
    # every exit on every test sample, the fixed-depth hull and per-group depths (one more pass)
    table = exits.exit_table(model, test_loader, measure.device_of(model), args.input_size,
                             max_batches=args.limit_batches or None, quiet=args.quiet)
    plots.plot_routing(args.out, table, exits.leaf_ids(table), test_loader.dataset)
    return final | exits.report(table)


def keep_and_calibrate(model, val_loader, args, progress: dict):
    """The model final.json describes: the best-validation weights (--keep best) or the last; for
    Juliet, the siblings validation rarely reaches pruned (prune_kept), then the stop decisions and
    the operating point fitted there (--calibrate)."""
    kept = {"keep": args.keep, "epoch": progress["epoch"]}
    if args.keep == "best" and os.path.exists(os.path.join(args.out, "model.pt")):
        model = checkpoints.load_model(args.out, args.device)
        kept["epoch"] = progress.get("best_epoch", kept["epoch"])
    cfg = grow_prune_config(args)
    if isinstance(model, JulietNet) and cfg.prune_kept and cfg.prunes:
        counts = measure.count_leaves(model, val_loader, args.device, quiet=args.quiet)
        pruned = prune_unvisited(model, cfg, measure.node_visits(model, counts), progress["step"])
        kept["pruned"] = [e["node"] for e in pruned]
    if isinstance(model, JulietNet) and args.calibrate:
        kept |= calibrate.calibrate_net(model, val_loader, args.device, args.stop_tolerance,
                                    args.input_size, args.quiet)
    checkpoints.save_model(args.out, model, kept["epoch"])
    return model, {"evaluated_checkpoint": kept}


# ----------------------------------------------------------------------------- a whole run


def prepare(args, make_datasets):
    """Checks, data and model, before any file is made: (args, checkpoint, datasets, config,
    model, profile)."""
    args, ckpt = runs.open_run(args)
    runs.setup_device(args)
    distributed.setup(args)  # under torchrun: this rank's device and the process group
    check_held_out(args, grow_prune_config(args))
    train_ds, val_ds, test_ds, num_classes = make_datasets(vars(args))
    if len(train_ds) < args.batch_size:
        raise UsageError(f"the training split has {len(train_ds)} images, fewer than --batch-size "
                         f"{args.batch_size}")
    config = vars(args) | {"num_classes": num_classes, "train_size": len(train_ds),
                           "val_size": len(val_ds), "test_size": len(test_ds),
                           "torch": torch.__version__}
    runs.seed_all(args.seed)
    if ckpt is None:
        model = build_model(args, num_classes, len(train_ds) // args.batch_size)
    elif args.eval_only and os.path.exists(os.path.join(args.resume, "model.pt")):  # the kept one
        model = checkpoints.load_model(args.resume)
    else:  # resume: rebuild the grown trie first, then load the weights
        model = checkpoints.model_from_checkpoint(ckpt, args.backbone, num_classes)
    try:  # dummy forwards through every stage: an input size the backbone cannot take fails here
        profile = measure.model_profile(model, args.dataset, args.input_size, num_classes)
        if isinstance(model, JulietNet):
            measure.dummy_path(model, args.input_size, stop_threshold=1.0)
    except RuntimeError as e:
        raise UsageError(f"--input-size {args.input_size} does not fit {args.backbone}: "
                         f"{str(e)[:100]}") from None
    return args, ckpt, (train_ds, val_ds, test_ds), config, model, profile


def train_and_test(args, make_datasets, on_epoch=None) -> dict:
    """Everything around the epoch loop: `prepare`, then with the run directory claimed
    (runs.py) optimiser, resume, fit, the kept model, test, plots."""
    t_start = time.perf_counter()
    args, ckpt, (train_ds, val_ds, test_ds), config, model, profile = prepare(args, make_datasets)
    # rank 0 (or the only process) writes the run directory; under torchrun the others compute
    with runs.claim_run_dir(args.out, ckpt) if distributed.is_main() else contextlib.nullcontext():
        if args.eval_only and distributed.is_main():  # beside the run's own files, never over them
            args.out = runs.new_eval_dir(args.out)
        model.to(args.device)
        distributed.broadcast_model(model)
        maybe_compile(model, args)
        opt, sched = make_optim(args, model)
        state = {"optimizer": opt, "scheduler": sched,
                 "scaler": torch.amp.GradScaler(enabled=args.amp)}
        progress = {"epoch": 0, "step": 0, "best_val_top1": 0.0, "history": [],
                    "train_size": len(train_ds)}
        if ckpt:
            for k in state:
                state[k].load_state_dict(ckpt[k])
            progress = ckpt["run"]
            runs.set_rng_state(ckpt["rng"])
        if distributed.is_main():
            runs.write_start(args.out, config, profile)
        if not args.eval_only:
            loaders = (data.make_loader(train_ds, config, shuffle=True),
                       data.make_loader(val_ds, config, shuffle=False))
            loaders = [distributed.shard(loader, args.seed) for loader in loaders]
            fit(model, loaders, args, progress, state, on_epoch)
        if not distributed.is_main():  # rank 0 alone runs the test set and writes final.json
            return {}
        model, kept = (model, {}) if args.eval_only else \
            keep_and_calibrate(model, loaders[1], args, progress)
        test_loader = data.make_loader(test_ds, config, shuffle=False)
        final = final_eval(model, test_loader, args, progress) | kept
        final["wall_time_s"], final["run_dir"] = time.perf_counter() - t_start, args.out
        runs.write_json(os.path.join(args.out, "final.json"), final)
        plots.plot_run(args.out, progress["history"], model, final)
    runs.write_final_line(final)
    return final


def parse_args(argv=None):
    return recipes.parse_args(argv, __doc__.split("\n\n")[0], "cifar")


def main(args, on_epoch=None) -> dict:
    """Train (or resume, or only evaluate); returns final.json. `on_epoch(log)` after each epoch."""
    return train_and_test(args, data.cifar_datasets, on_epoch)


if __name__ == "__main__":
    runs.cli(main, parse_args)
