"""What a deployed trie costs per image (§6.1; §6.4: FLOPs are not time): batch-1 latency against
the static model and the oracle, and where inference time goes, part by part. `profile.py --bench
--run RUN` reports both (bench.benchmark), on the trie as it is served:

    served = fold_exits(net)  # a copy: each exit's adapter and the head as one Linear
    latency({"static": static, "juliet_run": served}, served, images)  # per image, in blocks
    oracles(served, images)  # its paths without routing; and with the exits its decisions read
    breakdown(served, [x], repeats=5)  # {"parts_s": {"stem": s, ..., "routing": s}, ...}

Every part is timed on its own (`part_timer` wraps the stages, selectors, exits, leaves and the
forward pass; a part's time leaves out what runs nested in it), so the parts add up to the pass:
routing is what the trie does beyond running modules (deciding, partitioning, gathering, the head).
"""

import collections
import contextlib
import copy
import functools
import statistics
import time

import torch
import torch.nn as nn

import measure
from trie import STOP


def spread(ts) -> dict:
    """Median, mean, min, max, IQR and count of a list of seconds."""
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
    return {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts), "min_s": min(ts),
            "max_s": max(ts), "iqr_s": q3 - q1, "n": len(ts)}


def fold_exits(net):
    """A copy of the trie `net` to serve, in eval mode: each exit's adapter (§4.1) and the head's
    Linear as one Linear (C -> classes), and the head an identity, so every exit and leaf runs one
    small map where it ran a (C, head width) and a (head width, classes) one. The same logits up to
    float rounding (both maps are linear; routing reads the same exits), fewer MACs (its counts
    count the folded maps), for inference only: the original keeps training and checkpoints."""
    served = copy.deepcopy(net).eval()
    head = [m for m in served.head.modules() if isinstance(m, nn.Linear)][-1]  # eval: Dropout = id
    for key in [str(served.backbone.head_width), *served.adapters]:  # the head width: no adapter
        w, b = head.weight, head.bias
        if key in served.adapters:  # head(A x + a) = (H A) x + (H a + h)
            w, b = w @ served.adapters[key].weight, w @ served.adapters[key].bias + b
        served.adapters[key] = nn.utils.skip_init(nn.Linear, int(key), head.out_features)
        served.adapters[key].weight = nn.Parameter(w.detach().clone())
        served.adapters[key].bias = nn.Parameter(b.detach().clone())
    served.head = nn.Identity()
    return served


@contextlib.contextmanager
def part_timer(net):
    """{part: seconds} of `net`'s forward passes while the block runs, each part's own time (what
    runs nested in it taken out): the stem, each stage depth, the selectors, the exits they read,
    the leaves (GAP, adapter) and routing (the rest of forward: deciding, partitioning, gathering,
    the head). On CUDA each timed call synchronises."""
    seconds, inner, patched = collections.Counter(), [], []
    cuda, clock = measure.device_of(net).type == "cuda", time.perf_counter

    def wrap(owner, name, part):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                dt = clock() - t0
                seconds[part] += dt - inner.pop()
                if inner:
                    inner[-1] += dt
        setattr(owner, name, timed)  # an instance attribute: delattr restores the method
        patched.append((owner, name))

    for node in (n for n in net.nodes() if not n.is_stop):
        wrap(node.sub, "forward", f"stage {node.depth}" if node.depth else "stem")
        if node.selector is not None:
            wrap(node.selector, "forward", "selectors")
    for name, part in (("exit", "exits"), ("leaf", "leaves"), ("forward", "routing")):
        wrap(net, name, part)
    try:
        yield seconds
    finally:
        for owner, name in patched:
            delattr(owner, name)


def breakdown(net, batches: list, repeats: int) -> dict:
    """Where inference time goes, per batch of `batches`: each part measured (part_timer) and the
    timed passes whole (`total_s`), and passes without the timers (`untimed_s`: the timers' own
    cost is the difference), interleaved; the fastest of `repeats` (load only adds time), and
    how many batches each pass ran."""
    passes, device = [], measure.device_of(net)

    def run():
        measure.sync(device)
        t0 = time.perf_counter()
        [net(b) for b in batches]
        measure.sync(device)
        return (time.perf_counter() - t0) / len(batches)
    with measure.evaluating(net), torch.inference_mode():
        run()  # warm-up
        for _ in range(repeats):
            untimed = run()
            with part_timer(net) as seconds:
                passes.append((run(), untimed, {k: v / len(batches) for k, v in seconds.items()}))
    order = lambda k: (k != "stem", not k.startswith("stage"), k)  # noqa: E731
    total, _, parts = min(passes, key=lambda p: p[0])
    parts = {k: parts[k] for k in sorted(parts, key=order)}
    return {"total_s": total, "untimed_s": min(p[1] for p in passes), "parts_s": parts,
            "sum_s": sum(parts.values()), "batches": len(batches)}


def oracles(net, images) -> dict:
    """Per image i of `images`, fn(x, i): "oracle" runs the image's own path (as the trained trie
    routes it) as plain sequential code; "oracle_exits" also computes the exit at each node whose
    decision reads one: the floor of any rule that reads exits (juliet's time above it is the
    rule's own arithmetic and routing). Both return the trie's logits."""
    with measure.evaluating(net), torch.inference_mode():
        _, paths = net(images, return_paths=True)
    path = [net.path(p.removesuffix("/" + STOP)) for p in paths]

    def oracle_exits(x, i):
        for n in path[i][:-1]:
            x = n.sub(x)
            if net.reads_exit(n):
                net.exit(x)
        return net.exit(path[i][-1].sub(x))
    oracle = lambda x, i: net.exit(functools.reduce(lambda h, n: n.sub(h), path[i], x))  # noqa
    return {"oracle": oracle, "oracle_exits": oracle_exits}


def latency(models: dict, net, images, warmup=5, block=20) -> dict:
    """Batch 1, as a deployed model is called: `block` consecutive images through each model in
    turn (static, chain, juliet, then the oracles), then the next block, under inference_mode;
    spread per model over the images. A model runs after its own calls, as on a server, and never
    after another with its weights: one image at a time through each in turn, the oracle warmed
    the caches for the floor, which then took 0.89-0.91x the oracle's time for the same work."""
    from tqdm import tqdm

    fns = {**{k: lambda x, i, m=m: m(x) for k, m in models.items()}, **oracles(net, images)}
    times = {k: [] for k in fns}
    flags = [measure.evaluating(m) for m in models.values()]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for f in flags:
            stack.enter_context(f)
        n = len(images)  # block 0 warms up: the first `warmup` images
        blocks = [range(min(warmup, n))] + [range(s, min(s + block, n)) for s in range(0, n, block)]
        for b, block_i in enumerate(tqdm(blocks, desc="batch 1", leave=False)):
            for k, fn in fns.items():
                for i in block_i:
                    x = images[i][None]
                    measure.sync(x.device)
                    t0 = time.perf_counter()
                    fn(x, i)
                    measure.sync(x.device)
                    if b:
                        times[k].append(time.perf_counter() - t0)
    return {k: spread(ts) for k, ts in times.items()}


def format_deployment(r, labels: dict) -> str:
    """The batch-1 table and the breakdown of `bench.benchmark(run_dir=...)` as markdown."""
    m, p, lat = r["executed_macs"], r["parts"], r["latency"]
    lines = [f"batch 1 (deployment): median ms per image over {lat['static']['n']} "
             f"{r['latency_input']}, "
              "inference_mode, in blocks of 20 images per model", "",
              "| model | median ms (mean) | / static: median (mean) | executed MACs / static |",
              "|---|---|---|---|"]
    macs = {"juliet_run": f"{m['juliet_run_batch1'] / m['static']:.3f}x", "oracle": "the same",
            "oracle_exits": "the same, and exits"}
    for k, v in lat.items():
        mean = v["mean_s"] / lat["static"]["mean_s"]
        lines.append(f"| {labels[k]} | {1e3 * v['median_s']:.3f} ({1e3 * v['mean_s']:.3f}) | "
                     f"{r['latency_ratios'][k]:.3f}x ({mean:.3f}x) | {macs.get(k, '1.000x')} |")
    for base, label in (("oracle", "oracle (routing overhead)"),
                        ("oracle_exits", "oracle and exits (the rule and routing)")):
        over = [lat["juliet_run"][s] / lat[base][s] for s in ("median_s", "mean_s")]
        lines.append(f"| juliet / {label} | | {over[0]:.3f}x ({over[1]:.3f}x) | |")
    heads = [f"batch {b}: ms, share" for b in p]
    lines += ["", "where the trained trie's inference time goes (each part timed, nested out):",
              "", "| part | " + " | ".join(heads) + " |", "|---" * (1 + len(p)) + "|"]
    for part in dict.fromkeys(k for v in p.values() for k in v["parts_s"]):
        lines.append(f"| {part} | " + " | ".join(
            f"{1e3 * v['parts_s'].get(part, 0):.3f} ({v['parts_s'].get(part, 0) / v['sum_s']:.0%})"
            for v in p.values()) + " |")
    lines.append("| sum of parts / the same passes / passes without timers | " + " | ".join(
        f"{1e3 * v['sum_s']:.3f} / {1e3 * v['total_s']:.3f} / {1e3 * v['untimed_s']:.3f}"
        for v in p.values()) + " |")
    return "\n".join(lines)


