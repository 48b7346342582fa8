"""Wall time and memory of static vs Juliet, one process, interleaved (paper §6.1, Table 5):
`profile.py --bench`.

    benchmark("resnet18", batch=128, repeats=15)       # static vs a fresh chain, every selector on
    benchmark("resnet18", run_dir="runs/demo/juliet")  # and a trained trie, on its test images

The oracle is what routing costs: the same samples grouped by the leaf the trained trie chose, each
group run through its path's modules as plain sequential code (no selectors, partitions or
bookkeeping; inputs split beforehand). juliet / oracle is the price of the routing design; oracle /
static what the executed MACs can buy on this hardware. A train step is the default recipe's (task
loss, exit_loss, route_loss; full-depth training runs each sample to the stage leaf it chose); the
oracle's runs the same stage paths with the same exits, without the selectors and routing losses.

Every number is a median over interleaved repeats (static, juliet, static, juliet, ...), so drift
in the machine's load hits every model alike; ratios are against the static backbone timed in the
same process. Memory of one step: `step_peak_memory` (the CUDA allocator's peak during the step on
GPU; on CPU the peak of live tensors from torch.profiler's allocation events).
"""

import copy
import functools
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

import measure
from backbones import make_backbone, static_model
from checkpoints import load_run
from data import run_test_loader
from deploy import breakdown, fold_exits, format_deployment, latency, spread
from losses import juliet_loss
from routers import run_sub
from runs import UsageError
from trie import STOP, JulietNet

MODES = ("train", "inference")

# ----------------------------------------------------------------------------- a step, its memory


def labels_for(model, x):
    """Seeded random labels of the model's class count, one per sample of x."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # static: the last one
    classes = model.backbone.num_classes if isinstance(model, JulietNet) else heads[-1].out_features
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, classes, (x.shape[0],), generator=gen).to(x.device)


def train_step(model, loss):
    """(step, optimizer): one training step of `model` on `loss()` with Table 2's optimizer (Adam,
    lr 1e-3, weight decay 1e-5)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    return step, opt


def make_step(model, x, train):
    """One training step (forward, loss, backward, Table 2's Adam) or one no_grad inference batch.
    A Juliet step's loss is the default recipe's: task loss + exit_loss + route_loss."""
    if not train:
        return torch.no_grad()(lambda: model.eval()(x)), None
    y = labels_for(model, x)

    def loss():
        if isinstance(model, JulietNet):
            logits, record = model(x, return_record=True)
            return juliet_loss(model, record, logits, y)
        return F.cross_entropy(model(x), y)
    return train_step(model, loss)


def leaf_groups(net, x, train: bool) -> dict[str, torch.Tensor]:
    """{leaf: sample indices}: where a trained trie sends each sample of x (inference), or which
    stage leaf each runs in a training step (full depth), measured on a copy: no statistic moves."""
    net = copy.deepcopy(net).train(train)
    with torch.no_grad():
        _, paths = net(x, return_paths=True)
    return {leaf: torch.tensor([i for i, p in enumerate(paths) if p == leaf], device=x.device)
            for leaf in sorted(set(paths))}


def oracle_step(net, x, train):
    """The oracle of `net` on x: each leaf's samples, split beforehand, through its path's stages as
    plain sequential code, then GAP, adapter, head (and in training the exits the recipe trains)."""
    groups, y = leaf_groups(net, x, train), labels_for(net, x)
    parts = [(net.path(leaf.removesuffix("/" + STOP)), x[i].contiguous(), y[i])
             for leaf, i in groups.items()]

    @torch.no_grad()
    def infer():  # -> {leaf: logits of its samples}, for the equivalence test
        net.eval()
        return {leaf: net.exit(functools.reduce(lambda h, node: node.sub(h), path, h))
                for leaf, (path, h, _) in zip(groups, parts)}
    if not train:
        return infer, None

    def loss():
        total = 0.0
        for path, h, yg in parts:
            for node in path:
                h = run_sub(node.sub, h, True)
                if node.has_stop:  # the exit of deep supervision
                    total = total + F.cross_entropy(net.exit(h), yg, reduction="sum")
            total = total + F.cross_entropy(net.exit(h), yg, reduction="sum")
        return total / x.shape[0]
    return train_step(net, loss)


def profile_step(model, x, step, opt, device):
    """torch.profiler over one warmed-up step of `model` on x: (profiler, peak bytes of the live
    tensors allocated during the step, bytes of the tensors alive before it: params, buffers,
    optimizer state, the input batch)."""
    from torch.profiler import ProfilerActivity, profile

    if opt is not None:
        opt.zero_grad(set_to_none=True)  # old grads are freed before the profiled step
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)] if opt else []
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers(), x, *state])
    cuda = str(device).startswith("cuda")
    if cuda:
        measure.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:  # kineto's log ("gpuGetDeviceCount failed", ...) is noise without a GPU
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, profile_memory=True) as prof:
        step()
        measure.sync(device)
    if cuda:
        return prof, torch.cuda.max_memory_allocated(device) - before, held
    # Each CPU allocation and free is a "[memory]" event with a signed size; their running sum in
    # time order is the live tensor memory relative to the step's start.
    cpu = torch.autograd.DeviceType.CPU
    memory = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = sorted((e for e in memory if e.device_type() == cpu), key=lambda e: e.start_ns())
    return prof, max(itertools.accumulate((e.nbytes() for e in events), initial=0)), held


def step_peak_memory(model, input_size=32, batch=128, train=True, device="cpu", warmup=2) -> dict:
    """Peak memory of one training step or inference batch of a copy of `model` (§6.1 Table 5)."""
    model = copy.deepcopy(model).to(device)
    x = measure.random_images(batch, input_size, device=device)
    step, opt = make_step(model, x, train)
    for _ in range(warmup):  # Adam state and allocator caches exist before the measured step
        step()
    _, peak, before = profile_step(model, x, step, opt, device)
    what = ("activations saved for backward, temporaries, gradients (set to None before the step) "
            "and Adam update temporaries" if train else
            "activations and temporaries of a no_grad forward")
    how = ("torch.cuda.max_memory_allocated during the step minus memory_allocated at its start"
           if str(device).startswith("cuda") else
           "torch.profiler(profile_memory=True): running sum of the CPU allocator's events")
    return {"device": str(device), "mode": "train" if train else "inference", "batch": batch,
            "input_size": input_size, "peak_step_mb": peak / 1e6, "before_step_mb": before / 1e6,
            "peak_total_mb": (peak + before) / 1e6, "method": how,
            "includes": f"peak_step_mb: {what}, allocated during one warmed-up step; params, "
            "buffers, optimizer state and the input batch exist before the step: excluded there, "
            "counted in before_step_mb; peak_total_mb is their sum"}


# ----------------------------------------------------------------------------- wall time


def _no_early_exit(net):
    """The worst-case routing overhead: every selector runs, but the stop branch gets -inf."""
    def hook(selector, inputs, logits):
        if inputs[2]:
            return torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float("-inf"))], 1)
    for selector in (node.selector for node in net.nodes() if node.selector is not None):
        selector.register_forward_hook(hook)
    return net


def timed(steps: dict, repeats: int, warmup: int, device) -> dict:
    """{key: deploy.spread of the seconds of steps[key]}, interleaved (static, juliet, static, ...):
    drift hits all alike."""
    from tqdm import trange

    times = {key: [] for key in steps}
    for r in trange(warmup + repeats, desc="bench", leave=False):
        for key, (fn, _) in steps.items():
            measure.sync(device)
            t0 = time.perf_counter()
            fn()
            measure.sync(device)
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {key: spread(ts) for key, ts in times.items()}


def benchmark(backbone_name, input_size=32, batch=128, repeats=15, warmup=3, device="cpu",
              run_dir=None, num_classes=10, selector="transformer", images=200) -> dict:
    """Train-step and inference-batch wall time, static vs Juliet, one process, interleaved (§6.1
    Table 5). static: a fresh backbone (the same ops as a trained one); juliet_chain: a fresh chain,
    with `run_dir`'s options where given, whose selectors all run but never stop early (the worst
    case); juliet_run: `run_dir`'s trained trie, on its test images where its loader exists (else
    random images, with a warning: they do not follow its learned routes).
    Inference times the tries as served (deploy.fold_exits), a train step the trie as trained.
    Returns {"models": {name: {"train", "inference": spread, "conv_bwd_share", "peak_train_mb",
    "top_ops"}}, "ratios": {name: {"train", "inference"}} (median / static median), settings}; with
    a run also "latency" (batch 1 over `images` test images) and "parts" (breakdown at 1 and B)."""
    x = ones = trained = None
    if run_dir is not None:
        config, trained = load_run(run_dir, device)
        if not isinstance(trained, JulietNet):
            raise UsageError(f"{run_dir} is a static run; --run needs a Juliet run")
        backbone_name, num_classes, input_size = (
            config[k] for k in ("backbone", "num_classes", "input_size"))
        try:  # routing as learned needs real images
            test = run_test_loader(config).dataset
            x = torch.stack([test[i][0] for i in range(batch)]) if len(test) >= batch else None
            ones = torch.stack([test[i][0] for i in range(min(images, len(test)))])
        except UsageError as e:
            print(f"warning: timing random images, not {run_dir}'s test set ({e})", file=sys.stderr)
    torch.manual_seed(0)
    models = {"static": static_model(backbone_name, num_classes).to(device)}
    options = {"selector": selector} if trained is None else trained.options  # the run's recipe
    chain = JulietNet(make_backbone(backbone_name, num_classes), **options).to(device)
    models["juliet_chain"] = _no_early_exit(chain)
    if trained is not None:
        models["juliet_run"] = trained
    source = "random N(0,1)" if x is None else "the run's test set"
    x = (measure.random_images(batch, input_size) if x is None else x).to(device)
    # Each train step trains its own copy: Adam steps on random labels would move a trained trie's
    # routing, and its inference (and the oracle's groups) would time another trie. At batch 1
    # there is no train step: BatchNorm cannot normalise one sample by its batch statistics.
    modes = MODES if batch > 1 else ("inference",)
    # Inference times the tries as served (deploy.fold_exits: the exits folded), training a copy
    served = {k: fold_exits(m) if isinstance(m, JulietNet) else m for k, m in models.items()}
    steps = {(name, mode): make_step(copy.deepcopy(m) if mode == "train" else served[name], x,
                                     mode == "train")
             for mode in modes for name, m in models.items()}
    if trained is not None:  # the oracle trains its own copy: the trie's weights stay as trained
        models["oracle"] = copy.deepcopy(trained)
        for mode in modes:
            own = copy.deepcopy(trained) if mode == "train" else fold_exits(trained)
            steps[("oracle", mode)] = oracle_step(own, x, mode == "train")
    times = timed(steps, repeats, warmup, device)
    out = {"backbone": backbone_name, "input_size": input_size, "batch": batch,
           "repeats": repeats, "warmup": warmup, "device": str(device),
           "threads": torch.get_num_threads(), "input": source, "chain_options": chain.options,
           "models": {},
           "ratios": {n: {m: times[(n, m)]["median_s"] / times[("static", m)]["median_s"]
                          for m in modes} for n in models}}
    for name, model in models.items():
        out["models"][name] = {m: times[(name, m)] for m in modes}
        if batch == 1:
            continue
        step, opt = steps[(name, "train")]
        prof, peak, held = profile_step(model, x, step, opt, device)
        ops = prof.key_averages()
        # Table 5's "conv-bwd share": aten::convolution_backward (with its children) over all self
        # CPU time
        bwd = sum(a.cpu_time_total for a in ops if a.key == "aten::convolution_backward")
        out["models"][name] |= {
            "conv_bwd_share": bwd / max(sum(a.self_cpu_time_total for a in ops), 1e-9),
            "peak_train_mb": (peak + held) / 1e6,
            "top_ops": ops.table(sort_by="self_cpu_time_total", row_limit=8)}
    if trained is not None:  # the price of routing, and what the executed MACs buy
        q = out["ratios"]
        q["juliet_over_oracle"] = {m: q["juliet_run"][m] / q["oracle"][m] for m in modes}
        counts = {leaf: len(i) for leaf, i in leaf_groups(trained, x, False).items()}
        macs = measure.expected_macs(trained, counts, input_size)["expected_macs_per_sample"]
        out["executed_macs"] = {"static": measure.paper_macs(models["static"], input_size)[0],
                                "juliet_run": macs}
        out["latency_input"] = "random N(0,1) images" if ones is None else "test images"
        ones = (measure.random_images(images, input_size) if ones is None else ones).to(device)
        out["latency"] = latency({k: served[k] for k in ("static", "juliet_chain", "juliet_run")},
                                 served["juliet_run"], ones)
        counts = {leaf: len(i) for leaf, i in leaf_groups(trained, ones, False).items()}
        out["executed_macs"]["juliet_run_batch1"] = measure.expected_macs(
            trained, counts, input_size)["expected_macs_per_sample"]
        out["latency_ratios"] = {k: v["median_s"] / out["latency"]["static"]["median_s"]
                                 for k, v in out["latency"].items()}
        out["parts"] = {"1": breakdown(served["juliet_run"], list(ones[:, None]), 5)}
        if batch > 1:  # at --batch 1 the 200-image breakdown is the batch-1 one
            out["parts"][str(batch)] = breakdown(served["juliet_run"], [x], repeats)
    return out


def format_bench(result) -> str:
    """Table 5 as markdown: median [min-max] (IQR) seconds, and Juliet / static."""
    r, names = result, list(result["models"])
    labels = {"static": "static", "juliet_chain": "Juliet chain (all selectors, no early exit)",
              "juliet_run": "Juliet (trained run)", "oracle": "oracle (its paths, no routing)",
              "oracle_exits": "oracle and the exits its decisions read"}
    rows = [["metric", "static"] + [h for n in names[1:] for h in (labels[n], "ratio")]]
    rows.append(["---"] * len(rows[0]))
    for key, label in (("train", "train step (s)"), ("inference", "inference batch (s)"),
                       ("conv_bwd_share", "conv-bwd share of train-step CPU time"),
                       ("peak_train_mb", "peak train-step live tensors (MB)")):
        if key in r["models"]["static"]:  # batch 1: inference only
            rows.append([label] + [cell for n in names for cell in bench_cells(r, n, key)])
    title = (f"{r['backbone']}, batch {r['batch']}, {r['input_size']}x{r['input_size']}, "
             f"{r['device']} ({r['threads']} threads), input {r['input']}; {r['repeats']} repeats "
             f"after {r['warmup']} warm-up, interleaved; median [min-max] (IQR)")
    lines = [title, ""] + ["| " + " | ".join(row) + " |" for row in rows]
    if "juliet_over_oracle" not in r["ratios"]:
        return "\n".join(lines)
    q, m = r["ratios"], r["executed_macs"]
    lines += ["", "| | train step | inference |", "|---|---|---|"]
    ratio = lambda k, m: f"{q[k][m]:.3f}x" if m in q[k] else "n/a (batch 1)"
    lines += [f"| {label} | {ratio(k, 'train')} | {ratio(k, 'inference')} |"
              for k, label in (("juliet_over_oracle", "juliet / oracle (routing overhead)"),
                               ("juliet_run", "juliet / static"), ("oracle", "oracle / static"))]
    lines.append(f"| executed MACs, juliet / static | | {m['juliet_run'] / m['static']:.3f}x "
                 f"({m['juliet_run'] / 1e6:.2f} M / {m['static'] / 1e6:.2f} M) |")
    return "\n".join([*lines, "", format_deployment(r, labels)])


def bench_cells(r, n, key) -> list[str]:
    v, v0 = r["models"][n][key], r["models"]["static"][key]
    if isinstance(v, dict):
        cell = f"{v['median_s']:.3f} [{v['min_s']:.3f}-{v['max_s']:.3f}] (IQR {v['iqr_s']:.3f})"
        v, v0 = v["median_s"], v0["median_s"]
    elif key == "conv_bwd_share":  # a share: the change in points, as Table 5's "66% -> 60%"
        return [f"{v:.0%}"] + ([f"{100 * (v - v0):+.0f} pts"] if n != "static" else [])
    else:
        cell = f"{v:.1f}"
    return [cell] + ([f"{v / v0:.3f}x"] if n != "static" else [])
