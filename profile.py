"""profile.py: Juliet's measurements (paper §5.1, §5.2, §5.3, §6.1) -- and a superset of the stdlib `profile`.

FLOPs two ways, side by side (DESIGN §4):
  paper convention  THOP on ONE dummy input 1x3xSxS (S = 32 CIFAR, 224 ImageNet; §5.1, §5.2). THOP counts
                    MACs and the paper calls them FLOPs: reported as `flops_paper_convention_macs`. For a trie
                    it follows the one path the dummy takes, so it is only a proxy (`proxy: true`).
  executed          expected MACs per sample over data = sum over leaves of freq x path MACs (§2.1), a path
                    being its stage modules + every selector evaluated on it + adapter + head.
Training FLOPs/epoch ~ 3 x inference x |D_train| ("Computation of FLOPs/energy"; Table 4 also x epochs).

What the counters include. THOP 0.1.1 (module forward hooks): Conv (Cin/groups x k x k per output),
Linear (in_features per output), BatchNorm/LayerNorm (2 per element, x2 if affine), avg pools, Softmax, and
nn.MultiheadAttention through our `count_mha` (Q/K/V and out projections, QK^T, AV; THOP itself counts 0);
0 for ReLU/SiLU/Sigmoid, max pool, Dropout, Identity and functional ops (residual adds, SE products, GAP by
.mean, the selectors' score matmul); a module's params count only if its forward ran. FlopCounterMode
(torch.utils.flop_counter): conv, matmul and attention only, 2 FLOPs per MAC (we report /2), no norms.
Both run under `countable()` (MHA fast path off, MATH SDPA): in eval under no_grad the fused attention
kernels are invisible to both.

Memory: the CUDA allocator's peak on GPU; on CPU the peak of live tensors from torch.profiler's allocation
events over one warmed-up step. Wall time: static vs Juliet in one process, interleaved (Table 5).
Energy: NVML (nvidia-ml-py) power sampled on a thread, trapezoid rule; NaN and the reason without NVML.

    python profile.py --backbone resnet18 --static [--input-size 32] [--num-classes 10] [--json]
    python profile.py --backbone resnet18 [--router transformer] [--batch 128] [--json]  # fresh Juliet chain
    python profile.py runs/<name> [--json]      # a finished run on its test set; updates model_profile.json
    python profile.py --table runs/a runs/b ... [--out fig.png]   # Table 4 markdown + Fig. 4/5-style plot
    python profile.py --bench --backbone resnet18 [--batch 128] [--repeats 15] [--run runs/x]   # Table 5

--json prints one JSON object and nothing else on stdout. Profile keys (`model_profile`): dataset,
input_size, num_classes, params, params_thop, flops_paper_convention_macs, flops_paper_convention_note,
proxy, nvml_available, nvml_status, counters, and for a trie paper_convention_path. A fresh model adds
backbone, static, router, memory {train, inference} (`peak_memory`) and, for a trie, paths {leaf:
{thop_macs, flop_counter_macs}}; a run adds backbone, expected_macs_per_sample, params_executed and, for a
trie, expected_macs_samples, paths {leaf: {count, freq, macs}}, nodes {id: {visits, freq}}.

The stdlib's `profile` shares this file's name; `cProfile` imports it and torch imports `cProfile`
(torch._dynamo). With the repo directory first on sys.path `import profile` finds this file, so it loads
the standard library's profile.py under another name and re-exports what `cProfile` needs (`run`,
`runctx`, `Profile`, `_Utils`). Top-level imports stay plain `import x`: this module may run while torch
itself is still importing (DESIGN §1).
"""

import argparse
import collections
import contextlib
import copy
import importlib.util
import itertools
import json
import os
import statistics
import sys
import sysconfig
import threading
import time

import torch  # may be the half-imported module here: touch no torch attribute at import time


def _load_stdlib_profile():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "profile.py")
    spec = importlib.util.spec_from_file_location("_stdlib_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stdlib_profile = _load_stdlib_profile()
run, runctx, Profile, _Utils = (_stdlib_profile.run, _stdlib_profile.runctx,
                                _stdlib_profile.Profile, _stdlib_profile._Utils)

# thop, matplotlib, pynvml, tqdm, torchvision and the sibling modules (trie, backbones, train_cifar) are
# imported inside the functions that use them: torch may still be importing when this file runs (above).

PAPER_NOTE = ("THOP MACs on one dummy input 1x3xSxS: what the paper calls 'inference FLOPs' (§5.1). For a Juliet "
              "trie it follows the single path the dummy takes, so it is only a proxy of the executed cost; the "
              "honest number is expected_macs_per_sample over data.")
COUNTERS = {"thop": "module hooks: conv, linear, batch/layer norm (2/elt, x2 affine), avg pools, softmax, our "
                    "MultiheadAttention op; 0 for activations, max pool and functional ops",
            "flop_counter": "torch FlopCounterMode: conv, matmul, attention only; 2 FLOPs per MAC (reported /2)"}
_NAMES = {"resnet18": ("ResNet", "ResNet-{}18"), "resnet101": ("ResNet", "ResNet-{}101"),
          "densenet121": ("DenseNet", "DenseNet-{}121"), "efficientnet_b0": ("EfficientNet", "EfficientNet-{}B0")}


class BadInput(ValueError):
    """A user error the CLI reports in one line (exit 2)."""


# ----------------------------------------------------------------------------- FLOPs (MACs)


@contextlib.contextmanager
def countable():
    """no_grad, MHA fast path off, MATH SDPA: attention runs as linear + bmm ops that counters can see."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def _eval(model):
    """model.eval() for the block, then each submodule's own flag back (path modules share the net's modules)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def count_mha(m, inputs, output):
    """THOP rule for nn.MultiheadAttention (THOP 0.1.1 counts 0): MACs for the actual lengths L (query), S (key)."""
    q, k = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
    if q.dim() == 2:
        B, L, S = 1, q.shape[0], k.shape[0]
    elif m.batch_first:
        B, L, S = q.shape[0], q.shape[1], k.shape[1]
    else:
        B, L, S = q.shape[1], q.shape[0], k.shape[0]
    E = m.embed_dim
    macs = B * (L * E * E + S * m.kdim * E + S * m.vdim * E  # Q, K, V in-projections
                + L * S * E                                 # scores Q K^T: h heads x L x S x E/h
                + L * S * E                                 # weighted sum A V
                + L * E * E)                                # out-projection
    m.total_ops += torch.DoubleTensor([macs])


def thop_custom_ops() -> dict:
    return {torch.nn.MultiheadAttention: count_mha}


def _device(model):
    return next(model.parameters()).device


def _dummy(input_size, in_channels=3, device="cpu"):
    """The one dummy input of the paper's convention, seeded: for a trie, which path it takes is reproducible."""
    x = torch.randn(1, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    return x.to(device)


def _thop(model, *inputs):
    import thop

    model = copy.deepcopy(model)  # THOP leaves total_ops/total_params buffers on modules it did not hook
    with countable():
        macs, params = thop.profile(model, inputs=inputs, custom_ops=thop_custom_ops(), verbose=False)
    return float(macs), float(params)


def paper_macs(model, input_size=32, in_channels=3, x=None) -> tuple[float, float]:
    """(MACs, params) by THOP on one dummy 1xCxSxS input in eval (§5.1): the paper's 'FLOPs' and params.

    For a JulietNet both follow the dummy's path only (THOP counts a module when its forward runs).
    """
    return _thop(model, _dummy(input_size, in_channels, _device(model)) if x is None else x)


def dummy_path(net, input_size=32) -> str:
    """The leaf that the paper convention's dummy input reaches."""
    visits = copy.copy(net.visits)
    with _eval(net), torch.no_grad():
        _, paths = net(_dummy(input_size, net.backbone.in_channels, _device(net)), return_paths=True)
    net.visits = visits  # a measurement, not traffic
    return paths[0]


def _path_module(net, leaf_id):
    """An nn.Module running exactly the path root..leaf_id of `net` (shared modules, no copies): each stage
    sub-module, the selector of every node with >1 kid on its output (logits discarded: the path is fixed),
    GAP, the leaf's adapter and the head -- what trie.JulietNet._route runs for a sample ending there."""
    nn = torch.nn
    path = net.path(leaf_id)
    channels = str(net.backbone.stages[path[-1].depth].channels)

    class Path(nn.Module):
        def __init__(self):
            super().__init__()
            self.subs = nn.ModuleList(n.sub for n in path)
            routed = {str(i): n for i, n in enumerate(path) if len(n.kids) > 1}
            self.selectors = nn.ModuleDict({i: n.selector for i, n in routed.items()})
            self.routing = {i: (net.signatures(n), "stop" in n.branches) for i, n in routed.items()}
            self.adapter = net.adapters[channels] if channels in net.adapters else nn.Identity()
            self.head = net.head

        def forward(self, x):
            for i, sub in enumerate(self.subs):
                x = sub(x)  # (B, C_i, H_i, W_i)
                if str(i) in self.selectors:
                    self.selectors[str(i)](x, *self.routing[str(i)])  # (B, K)
            return self.head(self.adapter(x.mean((2, 3))))  # (B, num_classes)

    return Path()


def path_macs(net, leaf_id, input_size=32) -> float:
    """MACs per sample of one root-to-leaf path (THOP + count_mha on one dummy sample)."""
    module = _path_module(net, leaf_id)
    return _thop(module, _dummy(input_size, net.backbone.in_channels, _device(net)))[0]


def path_macs_table(net, input_size=32) -> dict[str, float]:
    return {leaf.node_id: path_macs(net, leaf.node_id, input_size) for leaf in net.leaves()}


def path_flops_counter(net, leaf_id, input_size=32) -> float:
    """FLOPs (2 per MAC) of the same path by torch's FlopCounterMode: conv/matmul/attention only. Runs under
    `countable()` (fast path off, MATH SDPA), else the eval-mode fused attention kernels count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    module = _path_module(net, leaf_id)
    with _eval(module), countable(), FlopCounterMode(display=False) as counter:
        module(_dummy(input_size, net.backbone.in_channels, _device(net)))
    return float(counter.get_total_flops())


def count_leaves(net, loader, device, max_batches=None) -> dict[str, int]:
    """Samples per leaf over a loader of (x, y) batches, eval forward (Alg. 1 at inference)."""
    from tqdm import tqdm

    counts = collections.Counter()
    with _eval(net), torch.no_grad():
        for b, batch in enumerate(tqdm(loader, desc="paths", leave=False)):
            if max_batches is not None and b >= max_batches:
                break
            _, paths = net(batch[0].to(device), return_paths=True)
            counts.update(paths)
    return dict(counts)


def expected_macs(net, leaf_counts: dict[str, int], input_size=32, table=None) -> dict:
    """E[C] = sum_leaf freq x path MACs (§2.1, DESIGN §4), with per-path and per-node breakdowns."""
    table = path_macs_table(net, input_size) if table is None else table
    n = sum(leaf_counts.values())
    unknown = sorted(set(leaf_counts) - set(table))
    if n == 0 or unknown:
        raise BadInput(f"leaf counts must be non-empty leaves of this trie; got {n} samples, unknown {unknown}")
    paths = {leaf: {"count": leaf_counts.get(leaf, 0), "freq": leaf_counts.get(leaf, 0) / n, "macs": macs}
             for leaf, macs in table.items()}
    visits = collections.Counter()
    for leaf, c in leaf_counts.items():
        visits.update({node.node_id: c for node in net.path(leaf)})  # a node is visited by every path through it
    nodes = {nd.node_id: {"visits": visits[nd.node_id], "freq": visits[nd.node_id] / n} for nd in net.nodes()}
    return {"expected_macs_per_sample": sum(p["freq"] * p["macs"] for p in paths.values()), "samples": n,
            "paths": paths, "nodes": nodes}


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def executed_params(net, leaf_counts: dict[str, int]) -> int:
    """Params of the modules on executed paths: stage subs, selectors evaluated, adapters used, the head."""
    modules = [net.head]
    for leaf, count in leaf_counts.items():
        if count:
            path = net.path(leaf)
            modules += [n.sub for n in path] + [n.selector for n in path if len(n.kids) > 1]
            channels = str(net.backbone.stages[path[-1].depth].channels)
            modules += [net.adapters[channels]] if channels in net.adapters else []
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


# ----------------------------------------------------------------------------- memory and wall time


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _make_step(model, x, train):
    """One training step (forward + CE + backward + Adam, Table 2's optimizer) or one no_grad inference batch."""
    import torch.nn.functional as F

    if not train:
        def infer():
            model.eval()
            with torch.no_grad():
                model(x)
        return infer, None
    if hasattr(model, "backbone"):  # a JulietNet; a static torchvision model ends with its classifier
        classes = model.backbone.num_classes
    else:
        classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    y, opt = y.to(x.device), torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step, opt


def _held_bytes(model, opt, x):
    """Tensors alive before a step: params, buffers, optimizer state, the input batch."""
    held = [*model.parameters(), *model.buffers(), x]
    held += [t for s in (opt.state.values() if opt else []) for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in held)


def _profile_step(step, opt, device):
    """torch.profiler over one warmed-up step: (profiler, peak bytes of live tensors allocated during the step)."""
    from torch.profiler import ProfilerActivity, profile

    if opt is not None:
        opt.zero_grad(set_to_none=True)  # old grads are freed before, not inside, the profiled step
    cuda = str(device).startswith("cuda")
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, profile_memory=True) as prof:
        step()
        _sync(device)
    if cuda:
        return prof, torch.cuda.max_memory_allocated(device) - before
    # Each CPU allocation and free is a "[memory]" event with a signed size; their running sum in time order
    # is the live tensor memory relative to the step's start (the aggregated op table nets them per op).
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e.start_ns())
    return prof, max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _conv_bwd_share(prof) -> float:
    """Table 5's "conv-bwd share": aten::convolution_backward (with its children) over all self CPU time."""
    averages = prof.key_averages()
    total = sum(a.self_cpu_time_total for a in averages)
    return sum(a.cpu_time_total for a in averages if a.key == "aten::convolution_backward") / max(total, 1e-9)


def peak_memory(model, input_size=32, batch=128, train=True, device="cpu", warmup=2) -> dict:
    """Peak memory of one training step or one inference batch of a copy of `model` (§6.1 Table 5, DESIGN §4)."""
    model = copy.deepcopy(model).to(device)
    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(device)
    step, opt = _make_step(model, x, train)
    for _ in range(warmup):  # Adam state and allocator caches exist before the measured step
        step()
    _, peak = _profile_step(step, opt, device)
    before = _held_bytes(model, opt, x)
    what = ("activations saved for backward, temporaries, gradients (set to None before the step) and Adam "
            "update temporaries" if train else "activations and temporaries of a no_grad forward")
    how = ("torch.cuda.max_memory_allocated during the step minus memory_allocated at its start"
           if str(device).startswith("cuda") else
           "torch.profiler(profile_memory=True): running sum of the CPU allocator's alloc/free events")
    return {"device": str(device), "mode": "train" if train else "inference", "batch": batch, "input_size": input_size,
            "peak_step_mb": peak / 1e6, "before_step_mb": before / 1e6, "peak_total_mb": (peak + before) / 1e6,
            "method": how, "includes": f"peak_step_mb: {what}, allocated during one warmed-up step; params, "
            "buffers, optimizer state and the input batch exist before the step: excluded there, counted in "
            "before_step_mb; peak_total_mb is their sum"}


def _spread(ts):
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "iqr_s": q3 - q1, "n": len(ts)}


def _no_early_exit(net):
    """Worst-case routing overhead: every selector runs, but the stop child (last logit, trie.kids) gets -inf."""
    def hook(selector, inputs, logits):
        if inputs[2]:
            return torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float("-inf"))], 1)  # (B, K)
    for node in net.nodes():
        if node.selector is not None:
            node.selector.register_forward_hook(hook)
    return net


def _images(loader, n):
    xs = []
    for batch in loader:
        xs.append(batch[0])
        if sum(len(t) for t in xs) >= n:
            return torch.cat(xs)[:n]
    return None


def bench(backbone_name, input_size=32, batch=128, repeats=15, warmup=3, device="cpu", run_dir=None,
          num_classes=10, router="transformer") -> dict:
    """Train-step and inference-batch wall time, static vs Juliet, one process, interleaved (§6.1 Table 5).

    juliet_chain: a fresh chain whose selectors all run but never stop early (worst-case routing overhead);
    juliet_run: `run_dir`'s trained trie routing as it learned, on the run's test images where its loader exists.
    Returns {"models": {name: {"train", "inference": _spread, "conv_bwd_share", "peak_train_mb", "top_ops"}},
    "ratios": {name: {"train", "inference"}} (median / static median), and the settings}.
    """
    from tqdm import trange

    from backbones import make_backbone, static_model
    from trie import JulietNet

    x, models = None, {}
    if run_dir is not None:
        config, trained = load_run(run_dir, device)
        if not _is_juliet(trained):
            raise BadInput(f"{run_dir} is a static run; --run needs a Juliet run")
        backbone_name, num_classes = config["backbone"], config["num_classes"]
        input_size = config.get("input_size", input_size)
        with contextlib.suppress(BadInput):  # routing as learned needs real images; else random ones
            x = _images(_test_loader(config), batch)
    torch.manual_seed(0)
    models["static"] = static_model(backbone_name, num_classes)
    models["juliet_chain"] = _no_early_exit(JulietNet(make_backbone(backbone_name, num_classes), router=router))
    if run_dir is not None:
        models["juliet_run"] = trained
    source = "random N(0,1)" if x is None else "the run's test set"
    if x is None:
        x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    steps = {(name, mode): _make_step(m.to(device), x, mode == "train") for mode in ("train", "inference")
             for name, m in models.items()}
    times = collections.defaultdict(list)
    for r in trange(warmup + repeats, desc="bench", leave=False):
        for key, (fn, _) in steps.items():  # static, juliet, static, juliet, ...: load drift hits both alike
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    out = {"backbone": backbone_name, "input_size": input_size, "batch": batch, "repeats": repeats, "warmup": warmup,
           "device": str(device), "threads": torch.get_num_threads(), "input": source, "models": {}, "ratios": {}}
    for name, model in models.items():
        step, opt = steps[(name, "train")]
        prof, peak = _profile_step(step, opt, device)
        out["models"][name] = {"train": _spread(times[(name, "train")]),
                               "inference": _spread(times[(name, "inference")]),
                               "conv_bwd_share": _conv_bwd_share(prof),
                               "peak_train_mb": (peak + _held_bytes(model, opt, x)) / 1e6,
                               "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)}
        out["ratios"][name] = {m: out["models"][name][m]["median_s"] / out["models"]["static"][m]["median_s"]
                               for m in ("train", "inference")}
    return out


def format_bench(result) -> str:
    """Table 5 as markdown: median [min-max] (IQR) seconds, and Juliet / static."""
    r, names = result, list(result["models"])
    labels = {"static": "static", "juliet_chain": "Juliet chain (all routers, no early exit)",
              "juliet_run": "Juliet (trained run)"}
    rows = [["metric", "static"] + [h for n in names[1:] for h in (labels[n], "ratio")]]
    rows.append(["---"] * len(rows[0]))
    for key, label in (("train", "train step (s)"), ("inference", "inference batch (s)"),
                       ("conv_bwd_share", "conv-bwd share of train-step CPU time"),
                       ("peak_train_mb", "peak train-step live tensors (MB)")):
        row = [label]
        for n in names:
            v, v0 = r["models"][n][key], r["models"]["static"][key]
            if isinstance(v, dict):
                row.append(f"{v['median_s']:.3f} [{v['min_s']:.3f}-{v['max_s']:.3f}] (IQR {v['iqr_s']:.3f})")
                v, v0 = v["median_s"], v0["median_s"]
            elif key == "conv_bwd_share":  # a share: the change in points, as Table 5's "66% -> 60%"
                row += [f"{v:.0%}"] + ([f"{100 * (v - v0):+.0f} pts"] if n != "static" else [])
                continue
            else:
                row.append(f"{v:.1f}")
            row += [f"{v / v0:.3f}x"] if n != "static" else []
        rows.append(row)
    title = (f"{r['backbone']}, batch {r['batch']}, {r['input_size']}x{r['input_size']}, {r['device']} "
             f"({r['threads']} threads), input {r['input']}; {r['repeats']} repeats after {r['warmup']} warm-up, "
             "interleaved; median [min-max] (IQR)")
    return "\n".join([title, ""] + ["| " + " | ".join(row) + " |" for row in rows])


# ----------------------------------------------------------------------------- energy (NVML)


def nvml_status() -> tuple[bool, str]:
    """(available, reason): NVML through nvidia-ml-py (import name pynvml)."""
    try:
        import pynvml
    except ImportError as e:
        return False, f"nvidia-ml-py not installed ({e})"
    try:
        pynvml.nvmlInit()
        try:
            return True, f"NVML ok: driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} GPU(s)"
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        return False, f"NVML unavailable: {e}"


def trapezoid_joules(times_s, watts) -> float:
    """J = sum_t (t_t - t_{t-1})/2 (P_{t-1} + P_t) (paper, "Computation of FLOPs/energy")."""
    t, p = [float(v) for v in times_s], [float(v) for v in watts]
    if len(t) != len(p):
        raise ValueError(f"times_s and watts differ in length ({len(t)} vs {len(p)})")
    if any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError("times_s must be strictly increasing")
    return sum((t1 - t0) / 2 * (p0 + p1) for t0, t1, p0, p1 in zip(t, t[1:], p, p[1:]))


class EnergyMeter:
    """GPU energy over a `with` block (§5.2): power sampled every `interval_s` on a background thread and
    integrated by the trapezoid rule (`joules`), beside the difference of NVML's total-energy counter where the
    GPU has one (`counter_joules`). Without NVML every energy field is NaN and `status` says why; never raises."""

    def __init__(self, index=0, interval_s=0.05):
        self.index, self.interval_s = index, interval_s
        self.joules = self.counter_joules = self.seconds = float("nan")
        self.status, self._handle, self._samples, self._stop = "", None, [], threading.Event()

    def _counter_mj(self):
        import pynvml

        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ since the driver loaded
        except pynvml.NVMLError:
            return None  # not supported on this GPU

    def _sample(self):
        import pynvml

        with contextlib.suppress(pynvml.NVMLError):  # a missed sample only widens one trapezoid
            self._samples.append((time.perf_counter(), pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000))  # W

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        self._t0 = time.perf_counter()
        ok, self.status = nvml_status()
        if ok:
            import pynvml

            try:
                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            except pynvml.NVMLError as e:
                self.status = f"NVML unavailable: {e}"
                return self
            self._c0 = self._counter_mj()
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        if self._handle is not None:
            import pynvml

            self._stop.set()
            self._thread.join()
            self._sample()
            c1 = self._counter_mj()
            if len(self._samples) >= 2:
                self.joules = trapezoid_joules(*zip(*self._samples))
            if self._c0 is not None and c1 is not None:
                self.counter_joules = (c1 - self._c0) / 1000
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
        return False

    def as_dict(self, images=None) -> dict:
        """Fields of an epoch log. NaN stays NaN: Python's json writes it as NaN (allow_nan)."""
        return {"energy_j": self.joules, "energy_counter_j": self.counter_joules, "energy_status": self.status,
                "energy_seconds": self.seconds, "energy_j_per_image": self.joules / images if images else float("nan")}


# ----------------------------------------------------------------------------- profiles of models and runs


def _is_juliet(model):
    from trie import JulietNet

    return isinstance(model, JulietNet)


def model_profile(model, dataset, input_size, num_classes) -> dict:
    """The content of model_profile.json (§5.3 "Profiling outputs")."""
    juliet = _is_juliet(model)
    macs, thop_params = paper_macs(model, input_size)
    ok, status = nvml_status()
    out = {"dataset": dataset, "input_size": input_size, "num_classes": num_classes, "params": total_params(model),
           "params_thop": thop_params, "flops_paper_convention_macs": macs,
           "flops_paper_convention_note": PAPER_NOTE if juliet else PAPER_NOTE.split(" For a Juliet")[0],
           "proxy": juliet, "nvml_available": ok, "nvml_status": status, "counters": COUNTERS}
    if juliet:
        out["paper_convention_path"] = dummy_path(model, input_size)
    return out


def _test_loader(config):
    try:
        import train_cifar  # the training script imports this module: import it only when needed

        make = train_cifar.make_test_loader
    except (ImportError, AttributeError) as e:
        raise BadInput(f"cannot load the run's test set: train_cifar.make_test_loader is unavailable ({e})") from e
    try:
        return make(config)
    except (OSError, RuntimeError, getattr(train_cifar, "UsageError", OSError)) as e:  # e.g. no data on disk
        raise BadInput(f"cannot load the run's test set: {e}") from e


def _check_run(run_dir):
    for name in ("", "config.json", "checkpoint.pt"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise BadInput(f"{run_dir} has no {name}" if name else f"{run_dir}: no such run directory")


def load_run(run_dir, device="cpu"):
    """(config, model) of a finished run: the trie is rebuilt from its structure, then the weights (STYLE 12)."""
    from backbones import static_model
    from trie import JulietNet

    _check_run(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    # Our own run's checkpoint: besides tensors it holds args and RNG state, which weights_only=True rejects.
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location=device, weights_only=False)
    s = ckpt.get("structure")
    model = static_model(config["backbone"], config["num_classes"]) if s is None else JulietNet.from_structure(s)
    model.load_state_dict(ckpt["model"])
    return config, model.to(device).eval()


def _read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def profile_run(run_dir, device="cpu", max_batches=None) -> dict:
    """Paper-convention and expected executed MACs of a finished run on its test set; merged into
    runs/<name>/model_profile.json."""
    config, model = load_run(run_dir, device)
    size = config.get("input_size", 32)
    out = {"backbone": config["backbone"], **model_profile(model, config.get("dataset"), size, config["num_classes"])}
    if out["proxy"]:
        counts = count_leaves(model, _test_loader(config), device, max_batches)
        exp = expected_macs(model, counts, size)
        out.update(expected_macs_per_sample=exp["expected_macs_per_sample"], expected_macs_samples=exp["samples"],
                   paths=exp["paths"], nodes=exp["nodes"], params_executed=executed_params(model, counts))
    else:  # every sample runs the same modules: the one-dummy count is the executed cost
        out.update(expected_macs_per_sample=out["flops_paper_convention_macs"], params_executed=out["params"])
    path = os.path.join(run_dir, "model_profile.json")
    merged = {**_read_json(path, {}), **out}
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    return out


def table_rows(run_dirs) -> list[dict]:
    """One Table 4 row per run. Training FLOPs = 3 x F_inf x |D_train| per epoch (§5.1); Table 4 also
    multiplies by the epochs (ResNet-18: 3 x 37.22 M x 45,000 x 60 = 301.5 T), so we do when config has them."""
    rows = []
    for run_dir in run_dirs:
        _check_run(run_dir)
        path, ckpt = os.path.join(run_dir, "model_profile.json"), os.path.join(run_dir, "checkpoint.pt")
        p = _read_json(path, {})
        if "expected_macs_per_sample" not in p or os.path.getmtime(ckpt) > os.path.getmtime(path):
            p = profile_run(run_dir)  # none yet, or the checkpoint changed since
        config = _read_json(os.path.join(run_dir, "config.json"))
        final = {**config, **_read_json(os.path.join(run_dir, "final.json"), {})}  # epochs run, test_top1
        top1 = final.get("test_top1")
        family, variant = _NAMES.get(config["backbone"], (config["backbone"], config["backbone"] + " {}"))
        scale = 3 * final.get("train_size", float("nan")) * final.get("epochs", 1) / 1e12
        rows.append({"run": run_dir, "family": family, "variant": variant.format("Juliet-" if p["proxy"] else ""),
                     "params_m": p["params"] / 1e6, "paper_macs_m": p["flops_paper_convention_macs"] / 1e6,
                     "expected_macs_m": p["expected_macs_per_sample"] / 1e6,
                     "train_t_paper": scale * p["flops_paper_convention_macs"],
                     "train_t_expected": scale * p["expected_macs_per_sample"], "top1": top1})
    return rows


def format_table(rows) -> str:
    out = ["| family | variant | params (M) | inference FLOPs (M; paper convention: THOP MACs, one dummy) | "
           "expected executed MACs (M) | training FLOPs (T; paper conv.) | training (T; executed) | test top-1 (%) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.2f}"
        out.append(f"| {r['family']} | {r['variant']} | {r['params_m']:.2f} | {r['paper_macs_m']:.2f} | "
                   f"{r['expected_macs_m']:.2f} | {r['train_t_paper']:.2f} | {r['train_t_expected']:.2f} | {top1} |")
    return "\n".join(out)


def plot_top1_per_gflop(rows, path):
    """Fig. 4/5 style bars: test top-1 per GFLOP (GMAC), paper convention beside expected executed MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["top1"] is not None]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 3.5))
    for dx, key, label in ((-0.2, "paper_macs_m", "paper convention"), (0.2, "expected_macs_m", "executed")):
        ax.bar([i + dx for i in xs], [r["top1"] / (r[key] / 1e3) for r in rows], 0.4, label=label)
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=20)
    ax.set_ylabel("test top-1 (%) per GFLOP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def profile_fresh(backbone, static=False, input_size=32, num_classes=10, router="transformer", batch=128,
                  device="cpu") -> dict:
    """A freshly built model: params, paper-convention MACs, per-path THOP vs FlopCounterMode/2, peak memory."""
    from backbones import make_backbone, static_model
    from trie import JulietNet

    torch.manual_seed(0)
    model = (static_model(backbone, num_classes) if static else
             JulietNet(make_backbone(backbone, num_classes), router=router)).to(device)
    out = {"backbone": backbone, "static": static, "router": None if static else router,
           **model_profile(model, None, input_size, num_classes)}
    if not static:
        out["paths"] = {leaf: {"thop_macs": macs, "flop_counter_macs": path_flops_counter(model, leaf, input_size) / 2}
                        for leaf, macs in path_macs_table(model, input_size).items()}
    out["memory"] = {mode: peak_memory(model, input_size, batch, mode == "train", device)
                     for mode in ("train", "inference")}
    return out


def _summary(p) -> str:
    """Human-readable report of profile_fresh / profile_run (markdown tables)."""
    M = lambda v: f"{v / 1e6:.2f}"
    lines = [f"{p['backbone']} ({'Juliet' if p['proxy'] else 'static'}): params {M(p['params'])} M",
             f"paper-convention FLOPs (THOP MACs, one 1x3x{p['input_size']}x{p['input_size']} dummy): "
             f"{M(p['flops_paper_convention_macs'])} M" +
             (f" -- follows one path only ({p['paper_convention_path']})" if p["proxy"] else "")]
    if "expected_macs_per_sample" in p:
        over = f"over {p['expected_macs_samples']} test samples" if p["proxy"] else "(static: every sample alike)"
        lines.append(f"expected executed MACs per sample: {M(p['expected_macs_per_sample'])} M {over}; "
                     f"executed params {M(p['params_executed'])} M")
    paths = p.get("paths", {})
    if paths and "thop_macs" in next(iter(paths.values())):
        lines += ["", "| leaf | THOP MACs (M) | FlopCounterMode/2 (M) | difference |", "|---|---|---|---|"]
        lines += [f"| {k} | {M(v['thop_macs'])} | {M(v['flop_counter_macs'])} | "
                  f"{v['thop_macs'] / v['flop_counter_macs'] - 1:+.2%} |" for k, v in paths.items()]
    elif paths:
        lines += ["", "| leaf | samples | freq | path MACs (M) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['count']} | {v['freq']:.3f} | {M(v['macs'])} |" for k, v in paths.items()]
        lines += ["", "| node | visits | freq |", "|---|---|---|"]
        lines += [f"| {k} | {v['visits']} | {v['freq']:.3f} |" for k, v in p["nodes"].items()]
    for mode, m in p.get("memory", {}).items():
        lines.append(f"peak memory, {mode} (batch {m['batch']}, {m['device']}): {m['peak_step_mb']:.1f} MB during "
                     f"the step + {m['before_step_mb']:.1f} MB before it = {m['peak_total_mb']:.1f} MB")
    return "\n".join(lines + [f"NVML: {p['nvml_status']}"])


def _fail(message):
    print(f"profile.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="profile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a finished run directory (runs/<name>), profiled on its test set")
    parser.add_argument("--backbone", help="profile a fresh model: resnet18, resnet101, densenet121, efficientnet_b0")
    parser.add_argument("--static", action="store_true", help="the static baseline instead of a Juliet chain")
    parser.add_argument("--input-size", type=int, default=32, help="32: CIFAR-10 (§5.1); 224: ImageNet (§5.2)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--router", default="transformer", help="transformer (§4.1), mlp or conv (§5.3)")
    parser.add_argument("--batch", type=int, default=128, help="batch of memory and --bench (Table 2: 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batches", type=int, help="run profile: count paths on this many test batches")
    parser.add_argument("--table", nargs="+", metavar="RUN", help="Table 4 for these runs, and the Fig. 4/5 plot")
    parser.add_argument("--out", help="--table: PNG path (default: RUN/top1_per_gflop.png of the first run)")
    parser.add_argument("--bench", action="store_true", help="Table 5: wall time, static vs Juliet")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--run", dest="bench_run", help="--bench: also time this run's trained trie")
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else, on stdout")
    parser.error = _fail  # one line and exit 2, like every other bad input
    args = parser.parse_args(argv)
    try:
        out, text = _dispatch(args)
    except BadInput as e:
        _fail(str(e))
    print(json.dumps(out, indent=2) if args.json else text)
    return out


def _dispatch(args):
    from backbones import BACKBONES

    if args.backbone is not None and args.backbone not in BACKBONES:
        raise BadInput(f"unknown backbone {args.backbone!r}; choose one of: {', '.join(BACKBONES)}")
    if args.table:
        rows = table_rows(args.table)
        png = plot_top1_per_gflop(rows, args.out or os.path.join(args.table[0], "top1_per_gflop.png"))
        return {"rows": rows, "plot": png}, f"{format_table(rows)}\n\nplot: {png}"
    if args.bench:
        if args.backbone is None and args.bench_run is None:
            raise BadInput("--bench needs --backbone or --run")
        r = bench(args.backbone, args.input_size, args.batch, args.repeats, args.warmup, args.device,
                  args.bench_run, args.num_classes, args.router)
        ops = [f"\n{name}: one train step, top operators by self CPU time\n{m['top_ops']}"
               for name, m in r["models"].items()]
        return r, "\n".join([format_bench(r), *ops])
    if args.run is not None:
        p = profile_run(args.run, args.device, args.max_batches)
    elif args.backbone is not None:
        p = profile_fresh(args.backbone, args.static, args.input_size, args.num_classes, args.router, args.batch,
                          args.device)
    else:
        raise BadInput("give a run directory, --backbone NAME, --table RUN [RUN ...] or --bench")
    return p, _summary(p)


if __name__ == "__main__":
    main()
