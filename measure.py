"""Measurement conventions: FLOPs both ways, params, peak memory, NVML energy, per-node time (paper
§5.1, §5.2, §5.3, §6.1). A library: the training scripts record these every epoch, profile.py
reports them.

FLOPs two ways, side by side:
  paper convention  THOP on ONE dummy input 1x3xSxS (S = 32 CIFAR, 224 ImageNet; §5.1, §5.2).
                    THOP counts MACs and the paper calls them FLOPs: `flops_paper_convention_macs`.
                    For a trie it follows the one path the dummy takes: a proxy (`proxy: true`).
  executed          the expected MACs per sample over data, sum over leaves of freq x path MACs
                    (§2.1); a path costs its stages, every selector evaluated on it and one exit
                    (adapter + head), counted per node (`node_macs`) and summed (`path_macs`).
Training FLOPs/epoch ~ 3 x inference x |D_train| ("Computation of FLOPs/energy"; Table 4: x epochs).

What the counters include (`COUNTERS`): THOP 0.1.1 counts nn.MultiheadAttention through our
`count_mha`, and 0 for functional ops (residual adds, SE products, GAP by .mean). Both run under
`countable()` (MHA fast path off, MATH SDPA): in eval under no_grad the fused attention kernels are
invisible to both.

Memory per epoch (`process_peak_bytes`): the CUDA allocator's peak on GPU, the process's peak RSS
on CPU (bench.py measures one step of one model: `bench.step_peak_memory`). Energy: energy.py.
"""

import collections
import contextlib
import copy
import time

import torch

import energy

PAPER_NOTE = ("THOP MACs on one dummy input 1x3xSxS: what the paper calls 'inference FLOPs' "
              "(§5.1). For a Juliet trie it follows the single path the dummy takes, so it is "
              "only a proxy of the executed cost; the honest number is expected_macs_per_sample "
              "over data.")
COUNTERS = {"thop": "module hooks: conv, linear, batch/layer norm (2/elt, x2 affine), avg pools, "
                    "softmax, our MultiheadAttention op; 0 for activations, max pool and "
                    "functional ops",
            "flop_counter": "torch FlopCounterMode: conv, matmul, attention only; 2 FLOPs per MAC "
                            "(reported /2)"}


# ----------------------------------------------------------------------------- FLOPs (MACs)


@contextlib.contextmanager
def countable():
    """no_grad, MHA fast path off, MATH SDPA: attention runs as linear + bmm ops counters see."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def evaluating(model):
    """model.eval() for the block, then each submodule's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def count_mha(m, inputs, output):
    """THOP's rule for nn.MultiheadAttention (THOP 0.1.1 counts 0): MACs for the actual lengths L
    (query) and S (key). The selectors' attention is batch_first, called as (query, key, value)."""
    (B, L, E), S = inputs[0].shape, inputs[1].shape[1]
    macs = B * (L * E * E + S * m.kdim * E + S * m.vdim * E  # Q, K, V in-projections
                + L * S * E                                 # scores Q K^T: h heads x L x S x E/h
                + L * S * E                                 # weighted sum A V
                + L * E * E)                                # out-projection
    m.total_ops += torch.DoubleTensor([macs])


def thop_custom_ops() -> dict:
    return {torch.nn.MultiheadAttention: count_mha}


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def random_images(batch, size, in_channels=3, device="cpu"):
    """A seeded N(0, 1) batch: the one dummy input of the paper's convention (batch 1: the path it
    takes is reproducible), and what bench.py measures on where no real images are at hand."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, in_channels, size, size, generator=gen).to(device)


def _thop(model, *inputs):
    import thop

    model = copy.deepcopy(model)  # THOP leaves total_ops buffers on modules it did not hook
    with countable():
        macs, params = thop.profile(model, inputs=inputs, custom_ops=thop_custom_ops(),
                                    verbose=False)
    return float(macs), float(params)


def paper_macs(model, input_size=32, in_channels=3, x=None) -> tuple[float, float]:
    """(MACs, params) by THOP on one dummy 1xCxSxS input in eval (§5.1): the paper's 'FLOPs' and
    params. For a JulietNet both follow the dummy's path only (THOP counts a module that runs)."""
    x = random_images(1, input_size, in_channels, device_of(model)) if x is None else x
    return _thop(model, x)


def dummy_path(net, input_size=32, stop_threshold=None) -> str:
    """The leaf the paper convention's dummy input reaches (`stop_threshold=1`: the deepest)."""
    with evaluating(net), torch.no_grad():
        x = random_images(1, input_size, net.backbone.in_channels, device_of(net))
        _, paths = net(x, return_paths=True, stop_threshold=stop_threshold)
    return paths[0]


def node_macs(net, input_size=32, count=None) -> dict[str, dict[str, float]]:
    """MACs of each stage node's parts on one dummy sample: its stage sub-module, its selector (0
    without one; with the exit it reads where `reads_exit`) and its exit (adapter + head on the
    pooled features). A path costs the stage and selector MACs of its nodes plus the one exit it
    ends at (`path_macs`). `count(module, *inputs)`: THOP (default) or `flop_counter_macs`."""
    count = count or (lambda module, *inputs: _thop(module, *inputs)[0])
    out = {}

    def rec(node, x):
        f = node.sub(x)  # (1, C, H, W)
        pooled = f.mean((2, 3))  # (1, C)
        adapter = net.adapters[str(f.shape[1])] if str(f.shape[1]) in net.adapters else None
        exit_macs = count(net.head, net.adapt(pooled))
        exit_macs += count(adapter, pooled) if adapter else 0.0
        selector = 0.0
        if node.selector is not None:
            read = net.exit(f) if net.reads_exit(node) else None
            selector = count(node.selector, f, net.signatures(node), node.has_stop, read)
            selector += exit_macs if read is not None else 0.0
        out[node.node_id] = {"stage": count(node.sub, x), "selector": selector, "exit": exit_macs}
        for kid in node.stage_branches:
            rec(kid, f)

    with evaluating(net), torch.no_grad():
        rec(net.root, random_images(1, input_size, net.backbone.in_channels, device_of(net)))
    return out


def path_macs(net, leaf_id, input_size=32, parts=None) -> float:
    """MACs per sample of one root-to-leaf path: its stage nodes' stages and selectors, and the exit
    of the last (a stop leaf's is its parent's) -- what JulietNet.route runs for a sample ending
    there."""
    parts = node_macs(net, input_size) if parts is None else parts
    path = [n for n in net.path(leaf_id) if not n.is_stop]
    return sum(parts[n.node_id]["stage"] + parts[n.node_id]["selector"] for n in path) + \
        parts[path[-1].node_id]["exit"]


def path_macs_table(net, input_size=32, parts=None) -> dict[str, float]:
    parts = node_macs(net, input_size) if parts is None else parts
    return {leaf.node_id: path_macs(net, leaf.node_id, input_size, parts) for leaf in net.leaves()}


def flop_counter_macs(module, *inputs) -> float:
    """MACs of module(*inputs) by torch's FlopCounterMode (conv, matmul, attention only: FLOPs / 2),
    under `countable()`, else the eval-mode fused attention kernels count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    with countable(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 2


def count_leaves(net, loader, device, max_batches=None, quiet=False) -> dict[str, int]:
    """Samples per leaf over a loader of (x, y) batches, eval forward (Alg. 1 at inference)."""
    from tqdm import tqdm

    counts = collections.Counter()
    with evaluating(net), torch.no_grad():
        for b, batch in enumerate(tqdm(loader, desc="paths", leave=False, disable=quiet)):
            if max_batches is not None and b >= max_batches:
                break
            _, paths = net(batch[0].to(device), return_paths=True)
            counts.update(paths)
    return dict(counts)


def node_visits(net, leaf_counts: dict[str, int]) -> collections.Counter:
    """Samples through each node, from samples per leaf: every path through a node visits it."""
    visits = collections.Counter()
    for leaf, c in leaf_counts.items():
        visits.update({node.node_id: c for node in net.path(leaf)})
    return visits


def expected_macs(net, leaf_counts: dict[str, int], input_size=32) -> dict:
    """E[C] = sum_leaf freq x path MACs (§2.1), with per-path and per-node breakdowns; leaf_counts:
    samples per leaf of this trie (count_leaves), at least one."""
    table = path_macs_table(net, input_size)
    n = sum(leaf_counts.values())
    paths = {leaf: {"count": leaf_counts.get(leaf, 0), "freq": leaf_counts.get(leaf, 0) / n,
                    "macs": macs} for leaf, macs in table.items()}
    visits = node_visits(net, leaf_counts)
    nodes = {nd.node_id: {"visits": visits[nd.node_id], "freq": visits[nd.node_id] / n}
             for nd in net.nodes()}
    return {"expected_macs_per_sample": sum(p["freq"] * p["macs"] for p in paths.values()),
            "samples": n, "paths": paths, "nodes": nodes}


class PathCosts:
    """Executed MACs of training batches: each leaf's path cost (`path_macs`), counted once per
    trie structure (`changed` after growth or pruning)."""

    def __init__(self, model, input_size: int):
        self.model, self.size = model, input_size
        self.parts, self.cache, self.macs, self.n = None, {}, 0.0, 0

    def add(self, leaf_counts: dict) -> None:
        for leaf, n in leaf_counts.items():
            if leaf not in self.cache:
                self.parts = self.parts or node_macs(self.model, self.size)
                self.cache[leaf] = path_macs(self.model, leaf, self.size, self.parts)
            self.macs, self.n = self.macs + n * self.cache[leaf], self.n + n

    def changed(self) -> None:
        self.parts, self.cache = None, {}

    def per_sample(self) -> float:
        return self.macs / max(1, self.n)


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def executed_params(net, leaf_counts: dict[str, int]) -> int:
    """Params of the modules on executed paths: stages, selectors evaluated, adapters, the head."""
    modules = [net.head]
    for leaf, count in leaf_counts.items():
        if count:
            path = net.path(leaf)
            modules += [n.sub for n in path] + [n.selector for n in path if len(n.branches) > 1]
            channels = str(net.backbone.stages[path[-1].depth].channels)
            modules += [net.adapters[channels]] if channels in net.adapters else []
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


# ----------------------------------------------------------------------------- memory and time


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def process_peak_bytes(device: str) -> int:
    """Per-epoch peak memory: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextlib.contextmanager
def module_timer(modules: dict):
    """Seconds spent in each of `modules` ({name: nn.Module}) while the block runs, by forward hooks
    ({name: s}, summed over calls). On CUDA each hook synchronises: time only when asked for."""
    seconds, starts, handles = collections.Counter(), {}, []

    def pre(module, inputs, name):
        sync(inputs[0].device)
        starts[name] = time.perf_counter()

    def post(module, inputs, output, name):
        sync(output.device)
        seconds[name] += time.perf_counter() - starts.pop(name)

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, i, name=name: pre(m, i, name)))
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: post(m, i, o, name)))
    try:
        yield seconds
    finally:
        for h in handles:
            h.remove()


def node_timer(net):
    """Seconds in each node's sub-module while the block runs ({node id: s}; §5.2's per-node
    throughput)."""
    return module_timer({node.node_id: node.sub for node in net.nodes()})


def model_profile(model, dataset, input_size, num_classes) -> dict:
    """The content of model_profile.json (§5.3 "Profiling outputs")."""
    juliet = hasattr(model, "root")  # a JulietNet, read through its methods: no model file imported
    macs, thop_params = paper_macs(model, input_size)
    ok, status = energy.nvml_status()
    out = {"dataset": dataset, "input_size": input_size, "num_classes": num_classes,
           "params": total_params(model),
           "params_thop": thop_params, "flops_paper_convention_macs": macs,
           "flops_paper_convention_note": PAPER_NOTE if juliet else PAPER_NOTE.split(" For a")[0],
           "proxy": juliet, "nvml_available": ok, "nvml_status": status, "counters": COUNTERS}
    if juliet:
        out["paper_convention_path"] = dummy_path(model, input_size)
    return out


