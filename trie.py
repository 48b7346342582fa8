"""The Juliet trie: `TrieNode`, `JulietNet`, batched top-1 routing (paper §3.1, §4.1, Algorithm 1).

A node at depth d runs a copy of backbone stage d (the root runs the stem). An internal node has a selector
(routers.py) that picks one child per sample; siblings are copies of the same stage (specialists). Each
internal node also has a *stop* child whose sub-module is the identity, so paths have different depths and
costs (Table 1 "dynamic depth"; §2.1). A leaf's features are pooled, mapped to the head width by a channel
adapter cached per channel count (§4.1), and classified by one shared head.

Algorithm 1, batched: at a node, f = sub(x); P = softmax(selector(f)) (Eq. 1); i* = argmax P; the batch is
partitioned by i* with one sort, each child runs once on its own sub-batch, and the leaf outputs are scattered
back into batch order once, at the end. No per-sample Python loop; no child runs on samples that did not
choose it. Gradient reaches the selectors through a straight-through gate per decision,
g = 1 + (P_i* - sg(P_i*)): exactly 1 forward, dP_i* backward; it scales the pooled leaf feature as an MoE gate.

The compute knob: with `stop_threshold=t`, a sample stops at the first node where P_stop >= t, else takes the
best stage child (t = 0: everyone stops at the root; t = 1: nobody). One checkpoint spans an accuracy-vs-MACs
curve (MSDNet's budgeted classification).

Ours (README "Paper notes and deviations"), each switchable: `stop_rule="half"` decides stop-or-go first
(P_stop >= 1/2), where Alg. 1's argmax ("argmax") stops once P_stop beats each sibling alone;
`train_depth="full"` runs every training sample to a leaf whatever it decides, so every exit and stop
decision learns from the true counterfactual ("routed": the paper).

Training-mode bookkeeping for grow_prune.py: EMA usage alpha per child (Alg. 1 line 6, lambda = 1 - beta),
EMA sigma^2 per node on L2-normalised GAP features (§4.2, in [0, 1]), and the split share of each node's
inputs (ours, `update_split`). The forward pass returns what it did, with `return_record`: a `Record` of each
decision's P, each exit's logits, each leaf's depth and where the decisions sent the batch, which the losses
(losses.py), growth (grow_prune.py) and the exit tables (exits.py) take as an argument.

    net = JulietNet(make_backbone("resnet18"), selector="transformer", policy="top1")
    logits, record = net(x, return_record=True)    # training: juliet_loss(net, record, logits, y)
    logits, paths = net(x, return_paths=True)      # paths[i]: leaf id reached by sample i, e.g. "0/0/stop"
    logits = net(x, stop_threshold=0.8)             # the compute knob: stop where P_stop >= 0.8
"""

import collections
import copy
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from routers import SELECTORS, STOP, STOP_RULES, choose, decide, make_selector

POLICIES = ("top1", "gumbel")
TRAIN_DEPTHS = ("full", "routed")


def run_sub(sub: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """sub(x), except that a lone training sample (routing makes sub-batches of one) is normalised with BatchNorm's
    running statistics: BatchNorm cannot normalise one value per channel (ResNet's layer4 at 32x32 is 1x1)."""
    if not (training and x.shape[0] == 1):
        return sub(x)
    bns = [m.eval() for m in sub.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    try:
        return sub(x)
    finally:
        for m in bns:
            m.train()


def check_options(backbone, prebuild, selector, policy, train_depth, beta, usage_beta, d_model, n_head, stop_rule,
                  stage_grad, stop_threshold, **_) -> None:
    """JulietNet's arguments, each bad one named in a ValueError."""
    for name, value, allowed in (("selector", selector, SELECTORS), ("policy", policy, POLICIES),
                                 ("train_depth", train_depth, TRAIN_DEPTHS), ("stop_rule", stop_rule, STOP_RULES)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    if not 1 <= prebuild <= len(backbone.stages):
        raise ValueError(f"prebuild must be in [1, {len(backbone.stages)}] for {backbone.name}, got {prebuild}")
    for name, value in (("stage_grad", stage_grad), ("stop_threshold", stop_threshold or 0.0)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    for name, value in (("beta", beta), ("usage_beta", usage_beta)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if d_model % n_head:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")


class TrieNode(nn.Module):
    """A trie node: a stage sub-module (N.sub), children (N.children) and, if it routes, a selector (N.PS)."""

    def __init__(self, node_id: str, depth: int, sub: nn.Module, stop: bool = False, in_channels: int = 0):
        super().__init__()
        self.node_id = node_id  # e.g. "0/1/3": per-parent child ids, never reused
        self.depth = depth      # stage index of `sub`; a stop child keeps its parent's depth
        self.is_stop = stop
        self.sub = sub
        self.child = nn.ModuleDict()  # N.children by local id (the name `children` is nn.Module's)
        self.selector = None
        self.next_child = 0
        self.register_buffer("alpha", torch.zeros(()))   # EMA usage, as seen by the parent (Eq. 3)
        self.register_buffer("sigma2", torch.zeros(()))  # EMA uncertainty proxy (§4.2)
        self.register_buffer("low_epochs", torch.zeros((), dtype=torch.long))  # Alg. 3 age counter
        self.register_buffer("split_share", torch.zeros(()))  # EMA growth trigger on the inputs (ours; update_split)
        self.register_buffer("principal", torch.zeros(2, in_channels))  # the inputs' EMA mean, top direction (0: none)
        self.register_buffer("prior", torch.zeros(2, in_channels))  # a grown specialist's side of a split (0: none)

    @property
    def stage_children(self) -> list["TrieNode"]:
        return [k for k in self.child.values() if not k.is_stop]

    @property
    def choices(self) -> list["TrieNode"]:
        """Children in the selector's logit order: stage children by age, then the stop child."""
        return self.stage_children + ([self.child[STOP]] if STOP in self.child else [])

    def extra_repr(self) -> str:
        return f"id={self.node_id!r}, depth={self.depth}" + (", stop" if self.is_stop else "")


class Record(NamedTuple):
    """What one forward pass did (`net(x, return_record=True)`): the input of the losses, of growth and of the exit
    tables. Nodes ride along as objects; DistributedDataParallel finds the tensors (all of them, nested)."""
    decisions: list  # (node, P (B_n, K)) at each routing node, in training
    exits: list  # (node, sample indices (B_n,), exit logits (B_n, classes), P (B_n, K), the stop child last)
    splits: list  # (node, P, per stage child: 1 for the samples its split prior sends it (B_n,), or None)
    input_shape: tuple  # (B, (H, W))
    leaf_depth: torch.Tensor | None = None  # (B,) depth of the leaf each sample's path ran to, in training
    leaf_counts: dict | None = None  # leaf id -> samples the decisions sent there (Alg. 2 grows at the busiest)
    ran_leaf_counts: dict | None = None  # leaf id -> samples whose path ran there (full-depth training runs on)


class JulietNet(nn.Module):
    """A backbone grafted onto a trie of routed nodes.

    backbone  any object with `name`, `num_classes`, `in_channels`, `head_width` (what the head reads), `stages` (the
              stem first; each with `make()` -> a fresh module, `channels` out, `sig_name`, the conv whose mean
              weights sign a child (§4.1), and `sig_dim`, its channels) and `initial(init_from=None)` -> (stage
              modules, head); `backbones.make_backbone` builds one from torchvision
    selector  selector architecture: "transformer" (§4.1), "mlp" or "conv" (§5.3)
    policy    "top1" (paper default, §4.1) or "gumbel" (hard Gumbel-softmax in training, §5.3)
    prebuild  nodes in the initial chain (§5.3 "Initialisation": 5 for ResNet-18, 10 for ResNet-101; default)
    stop      give every internal node a stop child (dynamic depth; README "Paper notes and deviations")
    stop_bias initial offset of the stop child's logit (routers.py); negative: start at full depth
    beta      EMA decay per step of sigma^2, the split share and (unless usage_beta is given) alpha (Eq. 3)
    train_depth "full" (ours: training samples run to a leaf whatever they decide) or "routed" (the paper)
    exit_confidence  stop decisions also read the exit's confidence (ours; routers.py); False: the paper's
    stop_rule "half" (ours: stop where P_stop >= 1/2, else the best stage child) or "argmax" (the paper)
    stage_grad share of the exits' and selectors' gradient that reaches the stages (ours; 0: the task loss alone)
    stop_threshold  operating point at inference, stop where P_stop >= it (exits.calibrate_net); None: stop_rule
    init_from a static model of the same backbone whose weights seed the prebuilt chain
    """

    def __init__(self, backbone, selector="transformer", policy="top1", prebuild: int | None = None, stop=True,
                 stop_bias=0.0, d_model=64, n_head=4, beta=0.99, usage_beta=None, train_depth="full",
                 exit_confidence=True, stop_rule="half", stage_grad=1.0, stop_threshold=None, init_from=None):
        super().__init__()
        prebuild = len(backbone.stages) if prebuild is None else prebuild
        self.backbone = backbone
        self.options = dict(selector=selector, policy=policy, stop=stop, stop_bias=stop_bias, d_model=d_model,
                            n_head=n_head, beta=beta, usage_beta=beta if usage_beta is None else usage_beta,
                            train_depth=train_depth, exit_confidence=exit_confidence,
                            stop_rule=stop_rule, stage_grad=stage_grad, stop_threshold=stop_threshold)
        check_options(backbone, prebuild, **self.options)
        self.tau = 1.0  # Gumbel temperature; the training loop anneals it (gumbel_tau)
        stages, self.head = backbone.initial(init_from)
        self.adapters = nn.ModuleDict()
        self.root = TrieNode("0", 0, stages[0], in_channels=backbone.in_channels)
        self.ensure_adapter(backbone.stages[0].channels)
        node = self.root
        for d in range(1, prebuild):
            node = self.add_child(node, sub=stages[d])
            node.alpha.fill_(1.0)  # a prebuilt chain child starts as the parent's only choice
        self.visits = collections.Counter()  # samples whose path ran through each node (train and eval)
        self.stage_macs_cache, self.signature_cache = {}, {}  # {(H, W): stage MACs}, {node id: (versions, sigs)}

    def nodes(self, node: TrieNode | None = None):
        """All nodes, pre-order."""
        node = self.root if node is None else node
        yield node
        for k in node.choices:
            yield from self.nodes(k)

    def node(self, node_id: str) -> TrieNode:
        root, *parts = node_id.split("/")  # "0/1/stop": the root, then a local child id per level
        if root != self.root.node_id:
            raise KeyError(node_id)
        return functools.reduce(lambda node, p: node.child[p], parts, self.root)

    def parent(self, node: TrieNode) -> TrieNode | None:
        return None if node is self.root else self.node(node.node_id.rsplit("/", 1)[0])

    def path(self, node_id: str) -> list[TrieNode]:
        """The nodes from the root to `node_id`, inclusive: what a sample ending there ran."""
        parts = node_id.split("/")
        return [self.node("/".join(parts[:i])) for i in range(1, len(parts) + 1)]

    def leaves(self) -> list[TrieNode]:
        return [n for n in self.nodes() if not n.choices]

    def ensure_adapter(self, channels: int) -> None:
        """A 1x1 channel adapter to the head width, one per channel count (§4.1); none at head width."""
        if channels != self.backbone.head_width and str(channels) not in self.adapters:
            linear = nn.Linear(channels, self.backbone.head_width)
            self.adapters[str(channels)] = linear.to(self.root.alpha.device)

    def add_child(self, parent: TrieNode, sub: nn.Module | None = None, local_id: str | None = None) -> TrieNode:
        """Attach a stage-(d+1) child to `parent` (fresh torchvision init unless `sub` is given). A leaf that gets its
        first child becomes internal: it gains a stop child and a selector."""
        d = parent.depth + 1
        if d >= len(self.backbone.stages):
            raise ValueError(f"node {parent.node_id} is at the last stage; it cannot have children")
        stage = self.backbone.stages[d]
        device = parent.alpha.device
        if local_id is None:
            local_id = str(parent.next_child)
            parent.next_child += 1
        sub = stage.make() if sub is None else sub
        child = TrieNode(f"{parent.node_id}/{local_id}", d, sub, in_channels=self.backbone.stages[d - 1].channels)
        child = child.to(device)
        first = not parent.child
        parent.child[local_id] = child
        self.ensure_adapter(stage.channels)
        if first and self.options["stop"]:
            stop = TrieNode(f"{parent.node_id}/{STOP}", parent.depth, nn.Identity(), stop=True)
            parent.child[STOP] = stop.to(device)
        if parent.selector is None and len(parent.choices) > 1:
            o = self.options
            in_ch, sig_dim = self.backbone.stages[parent.depth].channels, stage.sig_dim
            selector = make_selector(o["selector"], in_ch, sig_dim, o["d_model"], o["n_head"], o["stop_bias"],
                                     o["exit_confidence"])
            parent.selector = selector.to(device)
        return child

    def remove_child(self, parent: TrieNode, child: TrieNode) -> None:
        """Delete `child` and its subtree (Alg. 3 line 3); a parent left with no stage child is a leaf again."""
        del parent.child[child.node_id.rsplit("/", 1)[1]]
        if not parent.stage_children:
            if STOP in parent.child:
                del parent.child[STOP]
            parent.selector = None

    def structure(self) -> dict:
        """The trie as JSON-able data: enough, with the backbone name, to rebuild it (from_structure)."""

        def rec(n: TrieNode) -> dict:
            return {"id": n.node_id, "depth": n.depth, "stop": n.is_stop, "next_child": n.next_child,
                    "children": [rec(k) for k in n.choices]}

        return {"format": "juliet-trie/1", "backbone": self.backbone.name, "num_classes": self.backbone.num_classes,
                "options": dict(self.options), "adapters": [int(c) for c in self.adapters],
                "root": rec(self.root)}

    @classmethod
    def from_structure(cls, s: dict, backbone) -> "JulietNet":
        """Rebuild the trie of `structure()` on `backbone` (the same one, e.g. `make_backbone(s["backbone"],
        s["num_classes"])`); then `load_state_dict` restores the weights and statistics."""
        if (backbone.name, backbone.num_classes) != (s["backbone"], s["num_classes"]):
            raise ValueError(f"the structure is of {s['backbone']} with {s['num_classes']} classes, "
                             f"the backbone {backbone.name} with {backbone.num_classes}")
        net = cls(backbone, prebuild=1, **s["options"])
        templates, _ = backbone.initial()  # one constructor call; load_state_dict overwrites the weights
        for c in s["adapters"]:  # first, in their original order, so net.parameters() keeps its order
            net.ensure_adapter(c)

        def rec(node: TrieNode, spec: dict) -> None:
            node.next_child = spec["next_child"]
            for c in spec["children"]:
                if not c["stop"]:
                    kid = net.add_child(node, copy.deepcopy(templates[c["depth"]]), c["id"].rsplit("/", 1)[1])
                    rec(kid, c)

        rec(net.root, s["root"])
        return net

    def forward(self, x: torch.Tensor, return_paths: bool = False, stop_threshold: float | None = None,
                return_record: bool = False):
        """Logits (B, num_classes); with `return_paths` also each sample's leaf id, with `return_record` also the
        `Record` of the pass (in eval it holds every exit on the sample's path). `stop_threshold` t in [0, 1] replaces
        the operating point at inference: stop where P_stop >= t (t = 1: never; the "half" rule is t = 1/2)."""
        if x.ndim != 4 or x.shape[1] != self.backbone.in_channels:
            raise ValueError(f"input x must be (B, in_channels={self.backbone.in_channels}, H, W); "
                             f"got shape {tuple(x.shape)}")
        if stop_threshold is not None and not 0.0 <= stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {stop_threshold}")
        B = x.shape[0]
        rec = Record([], [], [], (B, tuple(x.shape[-2:]))) if self.training or return_record else None
        leaves, stopped = [], []  # (leaf id, sample indices (B_l,), pooled gated features (B_l, W), alive (B_l,))
        held_out = None if self.training else self.options["stop_threshold"]  # the operating point, at inference
        t = next((v for v in (stop_threshold, held_out) if v is not None), STOP_RULES[self.options["stop_rule"]])
        ones = torch.ones(B, device=x.device)  # product of straight-through gates along each path
        todo = [(self.root, x, torch.arange(B, device=x.device), ones, ones.bool(), None)]  # _route's arguments
        while todo:  # Alg. 1 line 7, pre-order from a stack: recursive frames held features (CPU inference +8%)
            todo += reversed(self._route(*todo.pop(), leaves, stopped, t, rec))
        idx = torch.cat([i for _, i, _, _ in leaves])  # (B,) sample index of each row
        z = torch.cat([z for _, _, z, _ in leaves])  # (B, W) in leaf order
        z = z.new_empty(z.shape).index_copy(0, idx, z)  # (B, W) scattered back to batch order
        logits = self.head(z)  # (B, num_classes)
        out = [logits]
        if return_paths:
            leaf_of = torch.cat([torch.full_like(i, k) for k, (_, i, _, _) in enumerate(leaves)])  # (B,) leaf number
            order = leaf_of.new_empty(B).index_copy(0, idx, leaf_of).tolist()
            out.append([leaves[k][0] for k in order])
        ran = {leaf: i.shape[0] for leaf, i, _, _ in leaves}  # outside training, also where the decisions went
        rec = None if rec is None else rec._replace(leaf_counts=ran, ran_leaf_counts=ran)
        if self.training:  # where top-1 sent each sample (one host sync), and the depth of the leaf that ran
            ids = [leaf for leaf, *_ in leaves] + [leaf for leaf, _ in stopped]
            counts = torch.stack([a.sum() for *_, a in leaves] + [m.sum() for _, m in stopped]).tolist()
            depth = torch.cat([torch.full_like(i, self.node(leaf).depth) for leaf, i, _, _ in leaves])  # (B,)
            rec = rec._replace(leaf_counts={leaf: c for leaf, c in zip(ids, counts) if c},
                               leaf_depth=depth.new_empty(B).index_copy(0, idx, depth))
        if return_record:
            out.append(rec)
        return out[0] if len(out) == 1 else tuple(out)

    def _route(self, node: TrieNode, x, idx, gate, alive, prev, leaves: list, stopped: list, t: float | None,
               rec: Record | None):
        """Alg. 1 at one node, on the sub-batch `x` of samples `idx` (`alive`: those top-1 sends here, the others run
        on in full-depth training; `prev`: the logits of the path's last exit; `rec`: what the pass records, None
        at plain inference) -> its children's sub-batches."""
        f = run_sub(node.sub, x, self.training)  # Alg. 1 line 2: (B_n, C, H, W)
        n = f.shape[0]
        self.visits[node.node_id] += n
        if self.training and not node.is_stop and n > 1:  # growth's statistics (grow_prune.py)
            update_sigma2(node, f, self.options["beta"])
            update_split(node, x, self.options["beta"])  # the root's (of the images) is never read
        choices, has_stop = node.choices, STOP in node.child
        if not choices:  # Alg. 1 line 3: a leaf
            z = self.adapt(f.mean((2, 3)))  # (B_n, W)
            leaves.append((node.node_id, idx, z * gate[:, None].to(z.dtype), alive))
            return []
        record = has_stop and rec is not None  # this node's exit, for the losses and tables
        fr = grad_scale(f, self.options["stage_grad"]) if self.training else f  # what the exit and selector read
        exit_logits = self.exit(fr) if record or self.reads_exit(node) else None  # (B_n, classes)
        read = None if exit_logits is None else exit_logits.detach()  # routing must not bend the exit's answer
        if len(choices) == 1:
            choice = None
        elif rec is None and not torch.is_grad_enabled():  # inference: the decision only
            choice = decide(node.selector(f, self.signatures(node), has_stop, read, prev), has_stop, t)  # (B_n,)
        else:
            logits = node.selector(fr, self.signatures(node), has_stop, read, prev)  # (B_n, K)
            tau = self.tau if self.training and self.options["policy"] == "gumbel" else None
            full = self.training and self.options["train_depth"] == "full"
            choice, top1, q, P = choose(logits, has_stop, t, tau, full)  # (B_n,) x 3, (B_n, K)
            gate = gate * (1.0 + (q - q.detach()))  # straight-through: exactly 1 forward, dP_i* backward
            if record:
                rec.exits.append((node, idx, exit_logits, P))  # (B_n,), (B_n, classes), (B_n, K): stop last
            if self.training:
                rec.decisions.append((node, P))
                if any(k.prior.any() for k in choices):  # grown specialists: the sides of their split priors
                    rec.splits.append((node, P, split_sides(node, fr)))
                update_alpha(choices, top1, alive, self.options["usage_beta"])
                if has_stop:  # where top-1 would have stopped; they run on only in full-depth training
                    stop_here = alive & (top1 == len(choices) - 1)
                    stopped.append((choices[-1].node_id, stop_here))
                    alive = alive & ~stop_here
        # Partition the sub-batch by chosen child: one sort, one gather, K contiguous slices.
        prev = prev if read is None else read
        counts = [n] if choice is None else torch.bincount(choice, minlength=len(choices)).tolist()
        if max(counts) == n:  # one child, or everyone chose the same one: no gather needed
            return [(choices[counts.index(n)], f, idx, gate, alive, prev)]
        perm = torch.argsort(choice, stable=True)  # (B_n,)
        parts = [[None] * len(counts) if v is None else v.index_select(0, perm).split(counts)
                 for v in (f, idx, gate, alive, prev)]  # K x (B_j, ...)
        return [(k, *(p[j] for p in parts)) for j, k in enumerate(choices) if counts[j]]

    def adapt(self, pooled: torch.Tensor) -> torch.Tensor:
        """The §4.1 1x1 channel adapter after GAP (they commute: HW-times fewer MACs). (B, C) -> (B, head width)."""
        key = str(pooled.shape[1])
        return self.adapters[key](pooled) if key in self.adapters else pooled

    def exit(self, f: torch.Tensor) -> torch.Tensor:
        """An exit, the one home of pool -> adapter -> head: (B, C, H, W) -> (B, num_classes)."""
        return self.head(self.adapt(f.mean((2, 3))))

    def reads_exit(self, node: TrieNode) -> bool:
        """Whether `node`'s selector reads its exit: a stop child, a choice, exit_confidence or a calibration."""
        return (STOP in node.child and len(node.choices) > 1
                and (self.options["exit_confidence"] or node.selector.calibrated))

    def signatures(self, node: TrieNode) -> torch.Tensor:
        """Weight signature of each stage child: its last conv's weights averaged to (C_out,) (§4.1), kept while the
        weights keep their version, so inference does not re-read them (layer4's: 2.4 M) every batch."""
        name = self.backbone.stages[node.depth + 1].sig_name
        ws = [k.sub.get_submodule(name).weight for k in node.stage_children]
        key = tuple((id(w), w._version) for w in ws)
        if self.signature_cache.get(node.node_id, (None,))[0] != key:
            sig = torch.stack([w.detach().float().mean((1, 2, 3)) for w in ws])  # (K_s, S)
            self.signature_cache[node.node_id] = (key, sig)
        return self.signature_cache[node.node_id][1]


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass (exactly), g times its gradient in the backward pass."""
    return x if g == 1.0 else x.detach() if g == 0.0 else x.detach() + g * (x - x.detach())


@torch.no_grad()
def update_alpha(choices: list[TrieNode], top1: torch.Tensor, alive: torch.Tensor, beta: float) -> None:
    """Alg. 1 line 6: alpha <- beta alpha + (1 - beta) (share of the node's samples choosing the child), if any."""
    w = alive.float()  # (B_n,) the samples top-1 sends to this node
    frac = torch.bincount(top1, weights=w, minlength=len(choices)) / w.sum().clamp(min=1)  # (K,)
    for kid, fr in zip(choices, frac):
        kid.alpha.copy_(torch.where(w.sum() > 0, beta * kid.alpha + (1 - beta) * fr, kid.alpha))


@torch.no_grad()
def update_sigma2(node: TrieNode, f: torch.Tensor, beta: float) -> None:
    """§4.2 proxy on unit-norm GAP features: mean ||u_i - mean(u)||^2 = 1 - ||mean(u)||^2, in [0, 1]."""
    u = F.normalize(f.float().mean((2, 3)), dim=1)  # (B_n, C)
    s2 = (u - u.mean(0)).pow(2).sum(1).mean()
    node.sigma2.mul_(beta).add_((1 - beta) * s2)


@torch.no_grad()
def split_sides(node: TrieNode, f: torch.Tensor) -> list[torch.Tensor | None]:
    """Per stage child of `node`: 1 for the samples its split prior sends it, else 0 (B_n,); None: it has none."""
    u = F.normalize(f.detach().float().mean((2, 3)), dim=1)  # (B_n, C)
    return [((u - k.prior[0]) @ k.prior[1] > 0).float() if k.prior.any() else None for k in node.stage_children]


@torch.no_grad()
def update_split(node: TrieNode, x: torch.Tensor, beta: float) -> None:
    """Ours: the share of the node's input variance one 2-way split explains, EMA'd into `split_share` (in [0, 1]),
    the unit-norm GAP inputs u split by the sign of (u - mean)·v, v their top direction (Oja: a power step a batch)."""
    u = F.normalize(x.float().mean((2, 3)), dim=1)  # (B_n, C)
    d = u - u.mean(0)
    mean, v = node.principal
    if not v.any():  # first batch: its exact top direction, the sign fixed (ranks average their directions)
        top = torch.linalg.svd(d, full_matrices=False)[2][0]
        v.copy_(top * top[top.abs().argmax()].sign())
        mean.copy_(u.mean(0))
    mean.mul_(beta).add_((1 - beta) * u.mean(0))
    v.copy_(F.normalize(beta * v + (1 - beta) * F.normalize(d.T @ (d @ v), dim=0), dim=0))
    between = sum(s.sum() * d[s].mean(0).pow(2).sum() for s in ((d @ v) > 0, (d @ v) <= 0) if s.any())
    node.split_share.mul_(beta).add_((1 - beta) * between / d.pow(2).sum().clamp(min=1e-12))
