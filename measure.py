"""Measurement conventions: FLOPs both ways, params, peak memory, NVML energy, per-node time (paper §5.1, §5.2,
§5.3, §6.1). A library: the training scripts record these every epoch, profile.py reports them.

FLOPs two ways, side by side:
  paper convention  THOP on ONE dummy input 1x3xSxS (S = 32 CIFAR, 224 ImageNet; §5.1, §5.2). THOP counts
                    MACs and the paper calls them FLOPs: reported as `flops_paper_convention_macs`. For a trie
                    it follows the one path the dummy takes, so it is only a proxy (`proxy: true`).
  executed          expected MACs per sample over data = sum over leaves of freq x path MACs (§2.1), a path
                    being its stage modules + every selector evaluated on it + adapter + head.
Training FLOPs/epoch ~ 3 x inference x |D_train| ("Computation of FLOPs/energy"; Table 4 also x epochs).

What the counters include (`COUNTERS`; THOP 0.1.1 counts nn.MultiheadAttention through our `count_mha`, and
0 for functional ops: residual adds, SE products, GAP by .mean). Both run under `countable()` (MHA fast path
off, MATH SDPA): in eval under no_grad the fused attention kernels are invisible to both.

Memory per epoch (`process_peak_bytes`): the CUDA allocator's peak on GPU, the process's peak RSS on CPU.
(bench.py measures one step of one model, which RSS cannot isolate: `bench.step_peak_memory`.) Energy: NVML
(nvidia-ml-py) power sampled on a thread, trapezoid rule; NaN and the reason without NVML.
"""

import collections
import contextlib
import copy
import threading
import time

import torch

from routers import STOP

PAPER_NOTE = ("THOP MACs on one dummy input 1x3xSxS: what the paper calls 'inference FLOPs' (§5.1). For a Juliet "
              "trie it follows the single path the dummy takes, so it is only a proxy of the executed cost; the "
              "honest number is expected_macs_per_sample over data.")
COUNTERS = {"thop": "module hooks: conv, linear, batch/layer norm (2/elt, x2 affine), avg pools, softmax, our "
                    "MultiheadAttention op; 0 for activations, max pool and functional ops",
            "flop_counter": "torch FlopCounterMode: conv, matmul, attention only; 2 FLOPs per MAC (reported /2)"}


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
def evaluating(model):
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


def device_of(model) -> torch.device:
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
    return _thop(model, _dummy(input_size, in_channels, device_of(model)) if x is None else x)


def dummy_path(net, input_size=32, stop_threshold=None) -> str:
    """The leaf that the paper convention's dummy input reaches (with `stop_threshold=1`: the deepest)."""
    visits = copy.copy(net.visits)
    with evaluating(net), torch.no_grad():
        x = _dummy(input_size, net.backbone.in_channels, device_of(net))
        _, paths = net(x, return_paths=True, stop_threshold=stop_threshold)
    net.visits = visits  # a measurement, not traffic
    return paths[0]


def _path_module(net, leaf_id):
    """An nn.Module running exactly the path root..leaf_id of `net` (shared modules, no copies): each stage
    sub-module, the selector of every node with >1 kid on its output (logits discarded: the path is fixed),
    with the exit (GAP, adapter, head) it reads where `exit_confidence` is on, then GAP, the leaf's adapter
    and the head -- what trie.JulietNet._route runs for a sample ending there."""
    nn = torch.nn
    path = net.path(leaf_id)

    class Path(nn.Module):
        adapt, exit = type(net).adapt, type(net).exit  # the net's own exit code, on this module's adapters and head

        def __init__(self):
            super().__init__()
            self.subs = nn.ModuleList(n.sub for n in path)
            routed = {str(i): n for i, n in enumerate(path) if len(n.choices) > 1}
            self.selectors = nn.ModuleDict({i: n.selector for i, n in routed.items()})
            self.routing = {i: (net.signatures(n), STOP in n.child) for i, n in routed.items()}
            self.reads_exit = {i for i, n in routed.items() if net.reads_exit(n)}
            self.adapters, self.head = net.adapters, net.head  # by channel count, as JulietNet.adapt picks them

        def forward(self, x):  # its own modules throughout: THOP counts a copy of this module
            for i, sub in enumerate(self.subs):
                x = sub(x)  # (B, C_i, H_i, W_i)
                if str(i) in self.selectors:
                    read = self.exit(x) if str(i) in self.reads_exit else None
                    self.selectors[str(i)](x, *self.routing[str(i)], read)  # (B, K)
            return self.exit(x)  # (B, num_classes)

    return Path()


def path_macs(net, leaf_id, input_size=32) -> float:
    """MACs per sample of one root-to-leaf path (THOP + count_mha on one dummy sample)."""
    module = _path_module(net, leaf_id)
    return _thop(module, _dummy(input_size, net.backbone.in_channels, device_of(net)))[0]


def path_macs_table(net, input_size=32) -> dict[str, float]:
    return {leaf.node_id: path_macs(net, leaf.node_id, input_size) for leaf in net.leaves()}


def node_macs(net, input_size=32) -> dict[str, dict[str, float]]:
    """MACs of each stage node's parts on one dummy sample: its stage sub-module, its selector (0 without
    one; with the exit it reads under `exit_confidence`) and its exit (adapter + head on the pooled features).
    A path costs the stage and selector MACs of its nodes plus the one exit it ends at, which is what
    `path_macs` counts (tested)."""
    out = {}

    def rec(node, x):
        f = node.sub(x)  # (1, C, H, W)
        pooled = f.mean((2, 3))  # (1, C)
        adapter = net.adapters[str(f.shape[1])] if str(f.shape[1]) in net.adapters else None
        exit_macs = _thop(net.head, net.adapt(pooled))[0]
        exit_macs += _thop(adapter, pooled)[0] if adapter else 0.0
        selector = 0.0
        if node.selector is not None:
            reads = net.reads_exit(node)
            read = net.exit(f) if reads else None
            selector = _thop(node.selector, f, net.signatures(node), STOP in node.child, read)[0]
            selector += exit_macs if reads else 0.0
        out[node.node_id] = {"stage": _thop(node.sub, x)[0], "selector": selector, "exit": exit_macs}
        for kid in node.stage_children:
            rec(kid, f)

    with evaluating(net), torch.no_grad():
        rec(net.root, _dummy(input_size, net.backbone.in_channels, device_of(net)))
    return out


def path_flops_counter(net, leaf_id, input_size=32) -> float:
    """FLOPs (2 per MAC) of the same path by torch's FlopCounterMode: conv/matmul/attention only. Runs under
    `countable()` (fast path off, MATH SDPA), else the eval-mode fused attention kernels count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    module = _path_module(net, leaf_id)
    with evaluating(module), countable(), FlopCounterMode(display=False) as counter:
        module(_dummy(input_size, net.backbone.in_channels, device_of(net)))
    return float(counter.get_total_flops())


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
    """Samples through each node, from samples per leaf: a node is visited by every path through it."""
    visits = collections.Counter()
    for leaf, c in leaf_counts.items():
        visits.update({node.node_id: c for node in net.path(leaf)})
    return visits


def expected_macs(net, leaf_counts: dict[str, int], input_size=32, table=None) -> dict:
    """E[C] = sum_leaf freq x path MACs (§2.1), with per-path and per-node breakdowns."""
    table = path_macs_table(net, input_size) if table is None else table
    n = sum(leaf_counts.values())
    unknown = sorted(set(leaf_counts) - set(table))
    if n == 0 or unknown:
        raise ValueError(f"leaf counts must be non-empty leaves of this trie; got {n} samples, unknown {unknown}")
    paths = {leaf: {"count": leaf_counts.get(leaf, 0), "freq": leaf_counts.get(leaf, 0) / n, "macs": macs}
             for leaf, macs in table.items()}
    visits = node_visits(net, leaf_counts)
    nodes = {nd.node_id: {"visits": visits[nd.node_id], "freq": visits[nd.node_id] / n} for nd in net.nodes()}
    return {"expected_macs_per_sample": sum(p["freq"] * p["macs"] for p in paths.values()), "samples": n,
            "paths": paths, "nodes": nodes}


class PathCosts:
    """Executed MACs of training batches: each leaf's path cost (measure.path_macs), cached until the trie changes."""

    def __init__(self, model, input_size: int):
        self.model, self.size, self.cache, self.macs, self.n = model, input_size, {}, 0.0, 0

    def add(self, leaf_counts: dict) -> None:
        for leaf, n in leaf_counts.items():
            if leaf not in self.cache:
                self.cache[leaf] = path_macs(self.model, leaf, self.size)
            self.macs, self.n = self.macs + n * self.cache[leaf], self.n + n

    def changed(self) -> None:
        self.cache.clear()

    def per_sample(self) -> float:
        return self.macs / max(1, self.n)


def total_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def executed_params(net, leaf_counts: dict[str, int]) -> int:
    """Params of the modules on executed paths: stage subs, selectors evaluated, adapters used, the head."""
    modules = [net.head]
    for leaf, count in leaf_counts.items():
        if count:
            path = net.path(leaf)
            modules += [n.sub for n in path] + [n.selector for n in path if len(n.choices) > 1]
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
    """Seconds spent in each of `modules` ({name: nn.Module}) while the block runs, by forward hooks ({name: s},
    summed over calls). On CUDA each hook synchronises, so time only when asked for."""
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
    """Seconds spent in each node's sub-module while the block runs ({node id: s}; §5.2 "throughput per node")."""
    return module_timer({node.node_id: node.sub for node in net.nodes()})


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


def nvml_index(device) -> int:
    """NVML's index of a CUDA device, for EnergyMeter: NVML counts GPUs in PCI order and ignores
    CUDA_VISIBLE_DEVICES, CUDA need not, so match the PCI address. 0 off CUDA or without NVML."""
    device = torch.device(device)
    if device.type != "cuda" or not nvml_status()[0]:
        return 0
    import pynvml

    props = torch.cuda.get_device_properties(device)
    pynvml.nvmlInit()
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            pci = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            if (pci.domain, pci.bus, pci.device) == (props.pci_domain_id, props.pci_bus_id, props.pci_device_id):
                return i
    except pynvml.NVMLError:
        pass
    finally:
        pynvml.nvmlShutdown()
    return device.index or 0


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



def model_profile(model, dataset, input_size, num_classes) -> dict:
    """The content of model_profile.json (§5.3 "Profiling outputs")."""
    juliet = hasattr(model, "root")  # a trie.JulietNet, read through its own methods: measure.py imports no model file
    macs, thop_params = paper_macs(model, input_size)
    ok, status = nvml_status()
    out = {"dataset": dataset, "input_size": input_size, "num_classes": num_classes, "params": total_params(model),
           "params_thop": thop_params, "flops_paper_convention_macs": macs,
           "flops_paper_convention_note": PAPER_NOTE if juliet else PAPER_NOTE.split(" For a Juliet")[0],
           "proxy": juliet, "nvml_available": ok, "nvml_status": status, "counters": COUNTERS}
    if juliet:
        out["paper_convention_path"] = dummy_path(model, input_size)
    return out


