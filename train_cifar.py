"""train_cifar.py: the paper's CIFAR-10 protocol (§5.1, Table 2), end to end, for Juliet or its static backbone.

    python train_cifar.py --backbone densenet121 --epochs 60             # Juliet-DenseNet-121 on CIFAR-10
    python train_cifar.py --backbone resnet18 --static                   # the static baseline (fetches CIFAR-10)
    python train_cifar.py --dataset synthetic --epochs 8                 # offline: the built-in synthetic set
    python train_cifar.py --resume runs/resnet18-juliet-20261124-101500  # continue an interrupted run
    torchrun --standalone --nproc_per_node 2 train_cifar.py --threads 1  # data parallel (distributed.py)

Every epoch (`fit`): train_one_epoch (growth, Alg. 2, every --grow-every mini-batches), evaluate on the 10%
validation split, end_epoch (pruning sweep, Alg. 3, every --prune-every epochs), ReduceLROnPlateau on
the validation loss, one log line, epoch_<k>.json, and checkpoint.pt (written atomically). At the end:
the test set, final.json and the plots. The run directory (runs.py) is never overwritten, and bad input
fails with one line before any file is made.

FLOPs are reported two ways (README "Results"): `*_paper_convention_macs` is THOP on one dummy input (what
the paper calls FLOPs; for Juliet it follows one path), `*_executed_macs*` is what the routed samples ran.
"""

import argparse
import contextlib
import os
import time
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
import data
import distributed
import exits
import measure
import plots
import runs
from backbones import BACKBONES, make_backbone, static_model
from grow_prune import MODES, STATISTICS, GrowPruneConfig, end_epoch, grow, prune_unvisited
from losses import freeze_selectors, gumbel_tau, juliet_loss
from routers import SELECTORS
from runs import NonFiniteLoss, UsageError
from trie import POLICIES, STOP_RULES, TRAIN_DEPTHS, JulietNet

# Named recipes (DiT's `DiT_models`): `--recipe NAME` sets these flags' defaults; explicit flags still win. "ours" is
# the parser's defaults (README "Paper notes and deviations"); "paper" turns every deviation off: routed training on
# the task loss alone, Alg. 1's argmax, sigma^2 growth and pruning (Alg. 2-3) alone, the last epoch as it was.
RECIPES = {
    "ours": {},
    "paper": dict(train_depth="routed", exit_weight=0.0, route_weight=0.0, stage_grad=1.0, no_exit_confidence=True,
                  stop_rule="argmax", calibrate=False, keep="last", grow_prune="both", grow_statistic="sigma2",
                  split_weight=0.0, prune_kept=False, usage_horizon=0.0),
}

LOSS_WEIGHTS = ("exit_weight", "route_weight", "cost_weight", "expected_cost_weight", "balance_weight", "split_weight")

# ----------------------------------------------------------------------------- model


def build_model(args, num_classes: int, steps_per_epoch: int):
    if args.static:
        return static_model(args.backbone, num_classes)
    usage_beta = 1 - 1 / max(1.0, args.usage_horizon * steps_per_epoch) if args.usage_horizon else None
    try:  # the library names the bad parameter in a ValueError: one line for the user
        return JulietNet(make_backbone(args.backbone, num_classes), selector=args.selector, policy=args.policy,
                         prebuild=args.prebuild, stop=not args.no_stop, stop_bias=args.stop_bias,
                         d_model=args.d_model, n_head=args.n_head, beta=args.ema_beta, train_depth=args.train_depth,
                         exit_confidence=not args.no_exit_confidence, stop_rule=args.stop_rule,
                         stage_grad=args.stage_grad, usage_beta=usage_beta)
    except ValueError as e:
        raise UsageError(str(e)) from None


def grow_prune_config(args) -> GrowPruneConfig:
    try:  # a bad value fails with one line, before any file is made (train_and_test calls this first)
        return GrowPruneConfig(mode=args.grow_prune, theta_grow=args.grow_threshold, theta_prune=args.prune_threshold,
                               grow_every=args.grow_every, prune_every=args.prune_every, t_min=args.t_min,
                               m_max=args.m_max, max_depth=args.max_depth, statistic=args.grow_statistic)
    except ValueError as e:
        raise UsageError(str(e)) from None


def maybe_compile(model, args) -> None:
    """torch.compile each stage in place (state_dict keys unchanged, no `_orig_mod.`), new nodes included."""
    if not args.compile:
        return
    for m in [n.sub for n in model.nodes()] if isinstance(model, JulietNet) else [model]:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=True)


def make_optim(args, model):
    """Table 2: Adam + ReduceLROnPlateau(min, 0.5, 3); Table 3: SGD + CosineAnnealingLR(T_max=40)."""
    params = model.parameters()  # one group: grown parameters join it (grow_prune.sync_optimizer)
    opt = (torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd) if args.optimizer == "adam" else
           torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd))
    schedulers = torch.optim.lr_scheduler
    sched = (schedulers.ReduceLROnPlateau(opt, mode="min", factor=args.lr_factor, patience=args.lr_patience)
             if args.scheduler == "plateau" else schedulers.CosineAnnealingLR(opt, T_max=args.t_max))
    return opt, sched


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(model, loader, opt, scaler, args, progress: dict) -> dict:
    """One pass over the training split, with growth (Alg. 2) after each mini-batch for a Juliet model."""
    juliet, device = isinstance(model, JulietNet), measure.device_of(model)
    cfg, costs, meter = grow_prune_config(args), measure.PathCosts(model, args.input_size), runs.Meter()
    events = []
    model.train()
    ddp = distributed.wrap(model)  # torchrun: DistributedDataParallel over today's trie; else the model itself
    for x, y in tqdm(loader, desc=f"epoch {progress['epoch']} train", leave=False, disable=args.quiet):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=args.amp):
            if juliet:  # the forward pass returns what it did; the losses read it
                logits, record = ddp(x, return_record=True)
                loss = juliet_loss(model, record, logits, y, **{k: getattr(args, k) for k in LOSS_WEIGHTS})
            else:
                logits = ddp(x)
                loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {progress['epoch']}, step {progress['step'] + 1}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # torchrun: DDP averages the gradients, overlapped with backward
        counts = distributed.sync_step(model, record.leaf_counts if juliet else {})  # alpha, sigma^2, BN; counts
        scaler.step(opt)
        scaler.update()
        progress["step"] += 1
        meter.add(logits, y, loss)
        if juliet:
            costs.add(record.ran_leaf_counts)  # what ran: in full-depth training, every path to its leaf
            new = grow(model, cfg, progress["step"], counts, opt)
            if new:
                distributed.broadcast_model(model)  # the new child: rank 0's weights on every rank
                events += [dict(e, epoch=progress["epoch"]) for e in new]
                costs.changed()
                freeze_selectors(model, progress["epoch"] <= args.route_warmup)
                maybe_compile(model, args)
                ddp = distributed.wrap(model)  # a new parameter list: DDP is rebuilt over it
        if args.limit_batches and meter.batches >= args.limit_batches:
            break
    out = meter.result("train")
    if juliet:
        out.update(train_executed_macs_per_sample=costs.per_sample(), train_node_visits=dict(model.visits))
    return out | {"events": events}


@torch.no_grad()
def evaluate(model, loader, args, split: str) -> dict:
    """Loss, top-1/5; for Juliet also per-leaf counts, node visits and per-node throughput (img/s)."""
    juliet, device, meter = isinstance(model, JulietNet), measure.device_of(model), runs.Meter()
    leaves, depth_sum, class_n = Counter(), Counter(), Counter()
    model.eval()
    if juliet:
        model.visits.clear()
    with measure.node_timer(model) if juliet else contextlib.nullcontext({}) as seconds:
        for x, y in tqdm(loader, desc=split, leave=False, disable=args.quiet):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=args.amp):
                logits, paths = model(x, return_paths=True) if juliet else (model(x), None)
            meter.add(logits, y, F.cross_entropy(logits.float(), y))
            if juliet:  # executed nodes and per-class traversal depth (§5.2 "Metrics")
                n = Counter(paths)
                counts = {leaf.node_id: n[leaf.node_id] for leaf in model.leaves() if leaf.node_id in n}  # pre-order
                leaves.update(counts)
                depth = {leaf: model.node(leaf).depth for leaf in counts}
                for c, leaf in zip(y.tolist(), paths):
                    depth_sum[c] += depth[leaf]
                    class_n[c] += 1
            if args.limit_batches and meter.batches >= args.limit_batches:
                break
    out = meter.result(split)
    if juliet:
        out[f"{split}_leaf_counts"] = dict(leaves)
        out[f"{split}_class_depth"] = {c: depth_sum[c] / n for c, n in class_n.items()}
        out[f"{split}_class_samples"] = dict(class_n)
        out[f"{split}_node_visits"] = dict(model.visits)
        out[f"{split}_node_throughput_img_s"] = {k: round(model.visits[k] / s, 1) for k, s in seconds.items() if s > 0}
        macs = measure.expected_macs(model, dict(leaves), args.input_size)
        out[f"{split}_executed_macs_per_sample"] = macs["expected_macs_per_sample"]
    return out


def fit(model, loaders, args, progress: dict, state: dict, on_epoch=None) -> None:
    """The epoch loop of §5.1: train, validate, prune (Alg. 3), step the scheduler, log, checkpoint."""
    train_loader, val_loader = loaders
    opt, sched, scaler = state["optimizer"], state["scheduler"], state["scaler"]
    juliet, gpu = isinstance(model, JulietNet), measure.nvml_index(args.device)
    for epoch in tqdm(range(progress["epoch"] + 1, args.epochs + 1), desc="epochs", disable=args.quiet):
        progress["epoch"] = epoch
        distributed.seed_epoch(args.seed, epoch, train_loader)  # same data order and draws with or without --resume
        if juliet:
            model.visits.clear()
            model.tau = gumbel_tau(epoch - 1, args.epochs, args.tau0, args.tau_min)
            freeze_selectors(model, epoch <= args.route_warmup)
        t0 = time.perf_counter()
        with measure.EnergyMeter(gpu) as e_train:
            log = train_one_epoch(model, train_loader, opt, scaler, args, progress)
        with measure.EnergyMeter(gpu) as e_val:
            log |= evaluate(model, val_loader, args, "val")
        if juliet:  # what the kept checkpoint is chosen on: routing is fitted afterwards (keep_and_calibrate)
            log["val_full_depth_top1"] = exits.full_depth_top1(model, val_loader, args.device)
        log = distributed.reduce_log(log)  # torchrun: each rank saw its own part of the data
        if juliet:
            warning = exits.collapse_message(log["val_leaf_counts"], len(model.leaves()))
            log["routing_collapsed"] = warning is not None
            if warning:
                tqdm.write(f"warning: epoch {epoch}: {warning}")
            prune_events = end_epoch(model, grow_prune_config(args), epoch, progress["step"], opt)
            log["events"] += [dict(e, epoch=epoch) for e in prune_events]
            if prune_events:
                maybe_compile(model, args)
        sched.step(log["val_loss"]) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
        log |= distributed.reduce_log(epoch_record(model, args, progress, opt, log, e_train, e_val,
                                                   time.perf_counter() - t0))
        score = log.get("val_full_depth_top1", log["val_top1"])
        best = score >= progress.get("best_score", -1.0)  # pytorch/examples' model_best; ties: the later epoch
        if best:
            progress["best_score"], progress["best_epoch"] = score, epoch
        progress["best_val_top1"] = max(progress["best_val_top1"], log["val_top1"])
        progress["history"].append(log)
        if distributed.is_main():
            runs.write_epoch(args.out, log, args.quiet)
            if best:
                checkpoints.save_model(args.out, model, epoch)
            checkpoints.save_checkpoint(args.out, model, state, progress, args)
        if on_epoch is not None:  # e.g. sweep.py's pruner; may raise to stop the run after a saved epoch
            on_epoch(log)


def epoch_record(model, args, progress, opt, log, e_train, e_val, seconds: float) -> dict:
    """The per-epoch fields of §5.3 "Profiling outputs" beyond loss and accuracy."""
    macs, _ = measure.paper_macs(model, args.input_size)
    n_train = progress["train_size"]
    rec = {"epoch": progress["epoch"], "step": progress["step"], "lr": opt.param_groups[0]["lr"],
           "time_epoch_s": seconds, "params": measure.total_params(model), "flops_paper_convention_macs": macs,
           # §5.1: training FLOPs/epoch ~ 3 x inference FLOPs x |D_train| (THOP MACs, one dummy input)
           "train_flops_epoch_paper_convention_macs": 3 * macs * n_train,
           "peak_memory_bytes": measure.process_peak_bytes(args.device)}
    rec |= {k.replace("energy", "energy_train"): v for k, v in e_train.as_dict(log["train_samples"]).items()}
    rec |= {k.replace("energy", "energy_val"): v for k, v in e_val.as_dict(log["val_samples"]).items()}
    if isinstance(model, JulietNet):
        # the honest twin: 3 x the MACs the routed training samples actually executed
        rec["train_flops_epoch_executed_macs"] = 3 * log["train_executed_macs_per_sample"] * n_train
        rec["n_nodes"] = sum(1 for _ in model.nodes())
        rec["structure"] = model.structure()["root"]
    return rec


def final_eval(model, test_loader, args, progress: dict) -> dict:
    """Test-set numbers for final.json: both FLOP conventions, side by side and named for what they are."""
    res = evaluate(model, test_loader, args, "test")
    macs, _ = measure.paper_macs(model, args.input_size)
    final = {k: v for k, v in res.items() if not k.startswith("test_node_throughput")}
    final |= {"flops_paper_convention_macs": macs, "params": measure.total_params(model),
              "epochs": progress["epoch"], "best_val_top1": progress["best_val_top1"],
              "train_size": progress["train_size"]}
    # Training MACs per epoch (§5.1's 3 x forward): the static backbone's beside Juliet's executed ones, which
    # in full-depth training run exits and selectors on top of every stage
    static = macs if not isinstance(model, JulietNet) else \
        measure.paper_macs(static_model(args.backbone, model.backbone.num_classes), args.input_size)[0]
    final["train_flops_epoch_static_macs"] = 3 * static * progress["train_size"]
    if isinstance(model, JulietNet):
        if progress["history"]:
            final["train_flops_epoch_executed_macs"] = progress["history"][-1]["train_flops_epoch_executed_macs"]
        exp = measure.expected_macs(model, res["test_leaf_counts"], args.input_size)
        final |= {"test_paths": exp["paths"],
                  "executed_params": measure.executed_params(model, res["test_leaf_counts"])}
        # Every exit on every test sample, the fixed-depth hull and per-group depths (one more pass)
        table = exits.exit_table(model, test_loader, measure.device_of(model), args.input_size,
                                   max_batches=args.limit_batches or None, quiet=args.quiet)
        final |= exits.report(table)
        plots.plot_routing(args.out, table, exits.leaf_ids(table), test_loader.dataset)
    else:  # a static model executes everything for every sample
        final["test_executed_macs_per_sample"] = macs
    return final


def keep_and_calibrate(model, val_loader, args, progress: dict):
    """The model final.json describes: the best-validation weights (--keep best) or the last ones; for Juliet, siblings
    validation rarely reaches pruned (--prune-kept), stop decisions and operating point fitted there (--calibrate)."""
    kept = {"keep": args.keep, "epoch": progress["epoch"]}
    if args.keep == "best" and os.path.exists(os.path.join(args.out, "model.pt")):
        model = checkpoints.load_model(args.out, args.device)
        kept["epoch"] = progress.get("best_epoch", kept["epoch"])
    if isinstance(model, JulietNet) and args.prune_kept and args.grow_prune in ("both", "prune-only"):
        reach = measure.node_visits(model, measure.count_leaves(model, val_loader, args.device, quiet=args.quiet))
        kept["pruned"] = [e["node"] for e in prune_unvisited(model, reach, args.prune_threshold, progress["step"])]
    if isinstance(model, JulietNet) and args.calibrate:
        kept |= exits.calibrate_net(model, val_loader, args.device, args.stop_tolerance, args.input_size, args.quiet)
    checkpoints.save_model(args.out, model, kept["epoch"])
    return model, {"evaluated_checkpoint": kept}


# ----------------------------------------------------------------------------- a whole run


def train_and_test(args, make_datasets, on_epoch=None) -> dict:
    """Everything around the epoch loop: checks, data, model, then (with the run directory claimed: runs.py)
    optimiser, resume, fit, test, plots. Bad input fails before any file is made."""
    t_start = time.perf_counter()
    args, ckpt = runs.open_run(args)
    runs.setup_device(args)
    distributed.setup(args)  # under torchrun: this rank's device and the process group
    grow_prune_config(args)
    config = vars(args)
    train_ds, val_ds, test_ds, num_classes = make_datasets(config)
    if len(train_ds) < args.batch_size:
        raise UsageError(f"the training split has {len(train_ds)} images, fewer than --batch-size {args.batch_size}")
    config = config | {"num_classes": num_classes, "train_size": len(train_ds), "val_size": len(val_ds),
                       "test_size": len(test_ds), "torch": torch.__version__}
    runs.seed_all(args.seed)
    if ckpt is None:
        model = build_model(args, num_classes, len(train_ds) // args.batch_size)
    elif args.eval_only and os.path.exists(os.path.join(args.resume, "model.pt")):  # the model the run kept
        model = checkpoints.load_model(args.resume)
    else:  # resume: rebuild the grown trie first, then load the weights
        model = checkpoints.model_from_checkpoint(ckpt, args.backbone, num_classes)
    try:  # dummy forwards, Juliet's through every stage: an input size the backbone's pooling cannot take fails here
        profile = measure.model_profile(model, args.dataset, args.input_size, num_classes)
        if isinstance(model, JulietNet):
            measure.dummy_path(model, args.input_size, stop_threshold=1.0)
    except RuntimeError as e:
        raise UsageError(f"--input-size {args.input_size} does not fit {args.backbone}: {str(e)[:100]}") from None
    # rank 0 (or the only process) writes the run directory; under torchrun the others only compute
    with runs.claim_run_dir(args.out, ckpt) if distributed.is_main() else contextlib.nullcontext():
        if args.eval_only and distributed.is_main():  # its results go beside the run's own files, never over them
            args.out = runs.new_eval_dir(args.out)
        model.to(args.device)
        distributed.broadcast_model(model)
        maybe_compile(model, args)
        opt, sched = make_optim(args, model)
        state = {"optimizer": opt, "scheduler": sched, "scaler": torch.amp.GradScaler(enabled=args.amp)}
        progress = {"epoch": 0, "step": 0, "best_val_top1": 0.0, "history": [], "train_size": len(train_ds)}
        if ckpt:
            for k in state:
                state[k].load_state_dict(ckpt[k])
            progress = ckpt["run"]
            runs.set_rng_state(ckpt["rng"])
        if distributed.is_main():
            if not os.path.exists(os.path.join(args.out, "config.json")):  # new run, an eval, a resume that lost it
                runs.write_json(os.path.join(args.out, "config.json"), config | {"out": args.out})
            runs.write_json(os.path.join(args.out, "model_profile.json"), profile)
        tqdm.write(f"{args.out}: {'static' if args.static else 'juliet'}-{args.backbone} "
                   f"params={profile['params'] / 1e6:.2f}M paper-convention MACs (one dummy input)="
                   f"{profile['flops_paper_convention_macs'] / 1e6:.2f}M; "
                   f"expected executed MACs per sample are measured on val every epoch")
        if not args.eval_only:
            loaders = (data.make_loader(train_ds, config, shuffle=True),
                       data.make_loader(val_ds, config, shuffle=False))
            fit(model, [distributed.shard(loader, args.seed) for loader in loaders], args, progress, state, on_epoch)
        if not distributed.is_main():  # rank 0 alone runs the test set and writes final.json
            return {}
        model, kept = (model, {}) if args.eval_only else keep_and_calibrate(model, loaders[1], args, progress)
        final = final_eval(model, data.make_loader(test_ds, config, shuffle=False), args, progress) | kept
        final["wall_time_s"], final["run_dir"] = time.perf_counter() - t_start, args.out
        runs.write_json(os.path.join(args.out, "final.json"), final)
        plots.plot_run(args.out, progress["history"], model, final)
    tqdm.write(f"test_top1={final['test_top1']:.2f} test_top5={final['test_top5']:.2f} "
               f"paper_MMACs={final['flops_paper_convention_macs'] / 1e6:.2f} "
               f"exec_MMACs={final['test_executed_macs_per_sample'] / 1e6:.2f} params={final['params'] / 1e6:.2f}M")
    return final


# ----------------------------------------------------------------------------- command line


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every flag, with Table 2 (CIFAR-10) defaults; train_imagenet.py swaps in Table 3's."""
    p = runs.Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.recipes = RECIPES  # runs.finish_args applies the chosen one before parsing
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet18", choices=BACKBONES, help="§5.1 backbones")
    g.add_argument("--static", action="store_true", help="the unmodified torchvision baseline (Table 4)")
    g.add_argument("--selector", default="transformer", choices=list(SELECTORS), help="N.PS (§4.1; §5.3 ablation)")
    g.add_argument("--policy", default="top1", choices=POLICIES, help="routing policy (§4.1 top-1; §5.3 gumbel)")
    g.add_argument("--tau0", type=runs.positive_float, default=1.0, help="gumbel: initial temperature (§3.1.3)")
    g.add_argument("--tau-min", type=runs.positive_float, default=0.1, help="gumbel: final temperature")
    g.add_argument("--prebuild", type=runs.positive, default=None, help="chain nodes (§5.3: 5; 10 for ResNet-101)")
    g.add_argument("--no-stop", action="store_true", help="no stop children: every path runs every stage")
    g.add_argument("--d-model", type=runs.positive, default=64, help="selector width d_model (§4.1)")
    g.add_argument("--n-head", type=runs.positive, default=4, help="selector heads n_head (§4.1)")
    g.add_argument("--ema-beta", type=runs.unit_interval, default=0.99, help="EMA beta/step of sigma^2, split share")
    g = p.add_argument_group("routing recipe (ours; README 'Paper notes and deviations')")
    g.add_argument("--recipe", default="ours", choices=RECIPES, help="named defaults for the flags below and the "
                   "growth and kept-checkpoint flags (RECIPES); flags given explicitly override them")
    g.add_argument("--train-depth", default="full", choices=TRAIN_DEPTHS,
                   help="full: training samples run to a leaf whatever they decide, so every exit and the rest "
                        "of the path are known (ours); routed: they stop where top-1 sends them (the paper)")
    g.add_argument("--route-weight", type=runs.nonneg_float, default=1.0, help="weight of losses.route_loss (ours)")
    g.add_argument("--cost-weight", type=runs.nonneg_float, default=0.05, help="route_loss's lambda_c (§6.2's λ)")
    g.add_argument("--exit-weight", type=runs.nonneg_float, default=1.0, help="weight of losses.exit_loss (ours)")
    g.add_argument("--stage-grad", type=runs.unit_interval, default=0.0, help="share of the exits' and selectors' "
                   "gradient that reaches the stages (ours; 0: the stages learn the task loss alone; 1: jointly)")
    g.add_argument("--no-exit-confidence", action="store_true", help="stop logits ignore the exit (the paper's)")
    g.add_argument("--stop-rule", default="half", choices=STOP_RULES, help="half: stop where P_stop >= 1/2, "
                   "else the best stage child (ours); argmax: top-1 over all children (Alg. 1, the paper)")
    g.add_argument("--stop-bias", type=float, default=0.0, help="initial stop-logit offset (negative: full depth)")
    g.add_argument("--route-warmup", type=runs.nonneg, default=0, help="epochs with frozen selectors (ours)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True, help="fit the stop decisions "
                   "and the operating point on the validation split after training (ours; exits.calibrate_net)")
    g.add_argument("--stop-tolerance", type=runs.nonneg_float, default=0.5, help="operating point: val points lost")
    g.add_argument("--expected-cost-weight", type=runs.nonneg_float, default=0.0, help="of losses.expected_cost_loss")
    g.add_argument("--balance-weight", type=runs.nonneg_float, default=0.0, help="of §2.2's losses.balance_loss")
    g = p.add_argument_group("growth and pruning (§3.1.1, Alg. 2-3)")
    g.add_argument("--grow-prune", default="off", choices=MODES, help="§5.3 modes; off by default (README)")
    g.add_argument("--grow-threshold", type=runs.unit_interval, default=0.4, help="theta_grow (Table 2; Table 3: 0.5)")
    g.add_argument("--prune-threshold", type=runs.unit_interval, default=0.1, help="theta_prune (Tables 2 and 3)")
    g.add_argument("--grow-every", type=runs.positive, default=10, help="mini-batches between growth tries (Table 3)")
    g.add_argument("--prune-every", type=runs.positive, default=3, help="E_prune, epochs (Table 2; Table 3: 5)")
    g.add_argument("--t-min", type=runs.positive, default=3, help="epochs of alpha < theta_prune before pruning")
    g.add_argument("--usage-horizon", type=runs.nonneg_float, default=0.25, help="epochs over which alpha (Eq. 3) "
                   "forgets, 1 / (1 - beta) steps (ours); 0: --ema-beta per step")
    g.add_argument("--m-max", type=runs.positive, default=3, help="M_max stage children per node (Alg. 2)")
    g.add_argument("--max-depth", type=runs.nonneg, default=None, help="deepest node depth (default: last stage)")
    g.add_argument("--grow-statistic", default="split", choices=STATISTICS, help="growth trigger (ours; §4.2)")
    g.add_argument("--prune-kept", action=argparse.BooleanOptionalAction, default=True, help="prune kept siblings "
                   "with < theta_prune of validation traffic (ours)")
    g.add_argument("--split-weight", type=runs.nonneg_float, default=1.0, help="weight of losses.split_loss (ours)")
    g = p.add_argument_group("data (§5.1, Table 2)")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    g.add_argument("--data-dir", default="./data", help="CIFAR root, or an image folder with train/ and test/")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="fetch CIFAR if absent")
    g.add_argument("--input-size", type=runs.positive, default=32,
                   help="image side (CIFAR: 32, resized to another; an ImageFolder's images must have it)")
    g.add_argument("--synthetic-size", type=runs.positive, default=10000, help="synthetic train+val images")
    g.add_argument("--data-seed", type=runs.seed_int, default=0, help="seed of the synthetic images")
    g.add_argument("--val-split", type=runs.open_unit, default=0.1, help="Table 2: 90/10 train/val split")
    g.add_argument("--split-seed", type=runs.seed_int, default=0, help="seed of the train/val split")
    g = p.add_argument_group("optimisation (Table 2 for CIFAR-10, Table 3 for ImageNet)")
    g.add_argument("--epochs", type=runs.positive, default=60, help="Table 2: 15, 30 or 60; §6.3: 120")
    g.add_argument("--batch-size", type=runs.positive, default=128, help="Table 2: 128; Table 3: 256")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="Table 2: Adam; Table 3: SGD")
    g.add_argument("--lr", type=runs.positive_float, default=1e-3, help="Table 2: 1e-3; Table 3: 0.1")
    g.add_argument("--momentum", type=runs.unit_interval, default=0.9, help="SGD only (Table 3: 0.9)")
    g.add_argument("--wd", type=runs.nonneg_float, default=1e-5, help="weight decay (Table 2: 1e-5; Table 3: 1e-4)")
    g.add_argument("--scheduler", default="plateau", choices=("plateau", "cosine"), help="Table 2; Table 3: cosine")
    g.add_argument("--lr-factor", type=runs.open_unit, default=0.5, help="plateau factor (Table 2)")
    g.add_argument("--lr-patience", type=runs.nonneg, default=3, help="plateau patience (Table 2)")
    g.add_argument("--t-max", type=runs.positive, default=40, help="cosine T_max (Table 3)")
    g.add_argument("--keep", default="best", choices=("best", "last"), help="the weights tested and kept in model.pt: "
                   "best validation top-1, ties to the later epoch (Juliet: at full depth; pytorch/examples), or last")
    runs.add_run_args(p)
    return p


def parse_args(argv=None):
    return runs.finish_args(build_parser(__doc__.split("\n")[0]), argv)


def main(args, on_epoch=None) -> dict:
    """Train (or resume, or only evaluate) and return final.json's content; `on_epoch(log)` after each epoch."""
    return train_and_test(args, data.cifar_datasets, on_epoch)


if __name__ == "__main__":
    runs.cli(main, parse_args)
