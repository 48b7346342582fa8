"""The Juliet trie: `TrieNode`, `JulietNet` and batched top-1 routing (§3.1, §4.1, Algorithm 1).

A node at depth d runs a copy of backbone stage d (the root runs the stem); its selector
(routers.py) picks one of its branches per sample. Sibling branches are copies of one stage
(specialists), and every internal node has a *stop* branch, an identity leaf, so paths differ in
depth and cost (Table 1; §2.1). A leaf's features are pooled, adapted to the head width (§4.1) and
classified by one head.

Algorithm 1 is `JulietNet.route`, batched: a node runs its sub-module on the samples that reached
it, and the batch is partitioned by each sample's top-1 branch, so every branch runs once, on its
own samples. No per-sample Python loop; no branch runs on samples that did not choose it.

    line 2   f <- N.sub(x)                   run_sub
    line 3   a leaf returns f                JulietNet.leaf (GAP, the §4.1 adapter)
    line 4   P <- softmax(N.PS(f))           JulietNet.choose: the selector's logits; Eq. 1's
                                            softmax opens routers.decide
    line 5   i* <- argmax_i P_i              routers.decide (with the stop rule and the knob)
    line 6   alpha EMA of each child         grow_prune.update_alpha, in training (Alg. 3 reads it)
    line 7   FORWARDPASS(f, N.children[i*])  routers.partition: a sub-batch per chosen branch

What training adds sits in named helpers, each called from one place, that a reader can skip:
`track_growth` (grow_prune.py: §4.2's sigma^2 and our split share), `JulietNet.record` (what
the losses read, alpha, and full-depth continuation: `alive` marks the samples top-1 still sends
down) and `straight_through` (routers.py: the gate 1 + (P_i* - sg(P_i*)), exactly 1 forward, dP_i*
backward). test_juliet.py checks the batched pass against a plain per-sample recursion of Alg. 1.
The compute knob, `net(x, stop_threshold=t)`, stops a sample at the first node where P_stop >= t.
"""

import copy
import functools
from typing import NamedTuple

import torch
import torch.nn as nn

import routers
from grow_prune import split_sides, track_growth, update_alpha
from routers import STOP, Record, Routed, Rows, decide, grad_scale, partition, run_sub

POLICIES = ("top1", "gumbel")  # §4.1's deterministic top-1; §5.3's annealed Gumbel
TRAIN_DEPTHS = ("full", "routed")  # ours: every training sample runs to a leaf; the paper's


class Leaf(NamedTuple):
    node: "TrieNode"
    z: torch.Tensor  # (B_l, head width) its samples' features: pooled, adapted and gated
    rows: Rows


# ----------------------------------------------------------------------------- the trie


class TrieNode(nn.Module):
    """A trie node: a stage sub-module (N.sub), branches (N.children) and, if it routes, N.PS."""

    def __init__(self, node_id: str, depth: int, sub: nn.Module, is_stop=False, in_channels=0):
        super().__init__()
        self.node_id = node_id  # e.g. "0/1/3": per-parent branch ids, never reused
        self.depth = depth  # stage index of `sub`; a stop branch keeps its parent's depth
        self.is_stop = is_stop
        self.sub = sub
        self.branches = nn.ModuleDict()  # in the selector's order: stage branches by age, stop last
        self.selector = None  # N.PS, once there is something to choose
        self.next_child = 0
        self.register_buffer("alpha", torch.zeros(()))  # EMA usage, as seen by the parent (Eq. 3)
        self.register_buffer("sigma2", torch.zeros(()))  # EMA uncertainty proxy (§4.2)
        self.register_buffer("low_epochs", torch.zeros((), dtype=torch.long))  # Alg. 3's age
        self.register_buffer("split_share", torch.zeros(()))  # our growth trigger (update_split)
        self.register_buffer("principal", torch.zeros(2, in_channels))  # inputs' mean, direction
        self.register_buffer("prior", torch.zeros(2, in_channels))  # a specialist's side of a split

    @property
    def has_stop(self) -> bool:
        return STOP in self.branches

    @property
    def stage_branches(self) -> list["TrieNode"]:
        return [k for k in self.branches.values() if not k.is_stop]


def check_options(backbone, prebuild, **o) -> None:
    """JulietNet's arguments, each bad one named in a ValueError."""
    names = {"selector": routers.SELECTORS, "policy": POLICIES, "train_depth": TRAIN_DEPTHS,
             "stop_rule": routers.STOP_RULES, "stop_go": routers.STOP_GO}
    for name, allowed in names.items():
        if o[name] not in allowed:
            raise ValueError(f"unknown {name} {o[name]!r}; choose one of: {', '.join(allowed)}")
    if not 1 <= prebuild <= len(backbone.stages):
        raise ValueError(f"prebuild must be in [1, {len(backbone.stages)}] for {backbone.name}, "
                         f"got {prebuild}")
    for name in ("stage_grad", "stop_threshold", "ema_beta", "usage_beta"):
        v, closed = o[name] or 0.0, not name.endswith("beta")  # an EMA's beta must be < 1
        if not (0.0 <= v <= 1.0 and (closed or v < 1.0)):
            raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {v}")
    if o["d_model"] % o["n_head"]:
        raise ValueError(f"d_model ({o['d_model']}) must be divisible by n_head ({o['n_head']})")


class JulietNet(nn.Module):
    """A backbone grafted onto a trie of routed nodes. The defaults are our recipe; the paper's is
    `train_depth="routed", exit_confidence=False, stop_rule="argmax", stage_grad=1.0`.

    backbone    `backbones.make_backbone(name)`, or any object with its interface (backbones.py)
    selector    "transformer" (§4.1), "mlp" or "conv" (§5.3)
    policy      "top1" (§4.1) or "gumbel" (hard Gumbel-softmax in training, §5.3)
    prebuild    nodes in the initial chain (§5.3: 5 for ResNet-18, 10 for ResNet-101); all stages
    stop        every internal node has a stop branch (ours: how a path ends early)
    ema_beta    EMA decay per step of sigma^2, the split share and (no usage_beta given) alpha
    usage_beta  alpha's EMA decay per step (Eq. 3's beta; Alg. 1's lambda is 1 - beta); None:
                ema_beta. train_cifar.py passes grow_prune.usage_decay (our usage horizon)
    train_depth "full" (ours: training samples run to a leaf whatever they decide) or "routed"
    exit_confidence  stop logits also read the exit's confidence (ours; routers.py)
    stop_rule   "half" (ours: P_stop >= 1/2 stops, else the best stage branch) or "argmax" (Alg. 1)
    stop_go     how a node that only chooses to stop or go on decides: "confidence" (ours: a
                logistic read of its exit's confidence, routers.ConfidenceSelector) or "selector"
    stage_grad  share of the exits' and selectors' gradient that reaches the stages (ours: 0)
    stop_threshold  the held-out operating point at inference (calibrate.py); None: stop_rule
    init_from   a static model of the same backbone whose weights seed the prebuilt chain
    """

    def __init__(self, backbone, selector="transformer", policy="top1", prebuild: int | None = None,
                 stop=True, d_model=64, n_head=4, ema_beta=0.99, usage_beta=None,
                 train_depth="full", exit_confidence=True, stop_rule="half", stop_go="confidence",
                 stage_grad=0.0, stop_threshold=None, init_from=None):
        super().__init__()
        prebuild = len(backbone.stages) if prebuild is None else prebuild
        self.backbone = backbone
        self.options = dict(selector=selector, policy=policy, stop=stop, d_model=d_model,
                            n_head=n_head, ema_beta=ema_beta,
                            usage_beta=ema_beta if usage_beta is None else usage_beta,
                            train_depth=train_depth, exit_confidence=exit_confidence,
                            stop_rule=stop_rule, stop_go=stop_go, stage_grad=stage_grad,
                            stop_threshold=stop_threshold)
        check_options(backbone, prebuild, **self.options)
        self.tau = 1.0  # Gumbel temperature; the training loop anneals it (losses.gumbel_tau)
        stages, self.head = backbone.initial(init_from)
        self.adapters = nn.ModuleDict()
        self.root = TrieNode("0", 0, stages[0], in_channels=backbone.in_channels)
        self.ensure_adapter(backbone.stages[0].channels)
        node = self.root
        for d in range(1, prebuild):
            node = self.add_child(node, sub=stages[d])
            node.alpha.fill_(1.0)  # a prebuilt chain child starts as its parent's only choice

    # ------------------------------------------------------------------------- Algorithm 1

    def forward(self, x: torch.Tensor, stop_threshold: float | None = None, return_paths=False,
                return_record=False):
        """Logits (B, num_classes); with `return_paths` also each sample's leaf id, with
        `return_record` also the pass's `Record`. `stop_threshold` t in [0, 1] (the compute knob)
        replaces the operating point at inference: stop where P_stop >= t (t = 1: never)."""
        if x.ndim != 4 or x.shape[1] != self.backbone.in_channels:
            raise ValueError(f"input x must be (B, in_channels={self.backbone.in_channels}, H, W); "
                             f"got shape {tuple(x.shape)}")
        if stop_threshold is not None and not 0.0 <= stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {stop_threshold}")
        B = x.shape[0]
        rec = Record([], [], (B, tuple(x.shape[-2:]))) if self.training or return_record else None
        ones = torch.ones(B, device=x.device) if torch.is_grad_enabled() or self.training else None
        rows = Rows(torch.arange(B, device=x.device), ones if torch.is_grad_enabled() else None,
                    ones.bool() if self.training else None, None)
        held_out = None if self.training else self.options["stop_threshold"]  # operating point
        t = next((v for v in (stop_threshold, held_out) if v is not None), self.rule)
        leaves = self.route(self.root, x, rows, t, rec)  # pre-order
        idx, z = leaves[0].rows.idx, leaves[0].z  # one leaf: the batch was never split
        if len(leaves) > 1:
            idx = torch.cat([leaf.rows.idx for leaf in leaves])  # (B,) batch index of each row
            z = torch.cat([leaf.z for leaf in leaves])  # (B, W) in leaf order
            z = z.new_empty(z.shape).index_copy(0, idx, z)  # batch order
        logits = self.head(z)  # (B, classes)
        out = [logits]
        if return_paths:
            leaf_of = torch.cat([torch.full_like(lf.rows.idx, k) for k, lf in enumerate(leaves)])
            order = leaf_of.new_empty(B).index_copy(0, idx, leaf_of).tolist()  # (B,) batch order
            out.append([leaves[k].node.node_id for k in order])
        if return_record:
            out.append(self.finish(rec, leaves, idx))
        return out[0] if len(out) == 1 else tuple(out)

    def route(self, node: TrieNode, x, rows: Rows, t: float | None, rec: Record | None) -> list:
        """Alg. 1 at `node` on the sub-batch x (B_n, C, H, W) of the samples `rows`: its leaves."""
        f = run_sub(node.sub, x, self.training)  # line 2: (B_n, C', H', W')
        if self.training:
            track_growth(node, x, f, self.options["ema_beta"])
        if not node.branches:  # line 3: a leaf
            return [self.leaf(node, f, rows)]
        choice, rows = self.choose(node, f, rows, t, rec)  # lines 4-6
        kids = list(node.branches.values())
        return [leaf for k, f_k, rows_k in partition(choice, len(kids), f, rows)  # line 7
                for leaf in self.route(kids[k], f_k, rows_k, t, rec)]

    def choose(self, node: TrieNode, f, rows: Rows, t, rec: Record | None):
        """Alg. 1 lines 4-6: the branch each sample runs (B_n,), or None where there is one branch,
        and the rows its samples carry on (their gate, the exit read here)."""
        if len(node.branches) == 1:
            return None, rows
        read = grad_scale(f, self.options["stage_grad"]) if self.training else f  # exits, selector
        selector, stop = node.selector, node.has_stop
        reads = stop and (rec is not None or self.reads_exit(node))
        exit_logits = self.exit(read) if reads else None  # (B_n, classes)
        seen = None if exit_logits is None else exit_logits.detach()  # routing never bends the exit
        tokens = not isinstance(selector, routers.ConfidenceSelector)
        sigs = self.signatures(node) if tokens else None  # (K_s, S)
        logits = selector(read, sigs, stop, seen, rows.prev)  # line 4: (B_n, K)
        gumbel = self.training and self.options["policy"] == "gumbel"
        full = self.training and self.options["train_depth"] == "full"
        lean = rec is None and rows.gate is None  # inference: only the choice is needed
        c = decide(logits, stop, t, self.tau if gumbel else None, full, lean)  # line 5
        gate = None if rows.gate is None else routers.straight_through(rows.gate, c.q)
        rows = rows._replace(prev=rows.prev if seen is None else seen, gate=gate)
        if rec is not None:
            rows = self.record(node, c, exit_logits, read, rows, rec)  # line 6, the losses' input
        return c.run, rows

    def record(self, node: TrieNode, c, exit_logits, read, rows: Rows, rec: Record) -> Rows:
        """What the losses and the exit tables read; in training, alpha (Alg. 1 line 6) and
        full-depth continuation: a sample top-1 stops here runs on, no longer `alive`."""
        priors = self.training and any(k.prior.any() for k in node.stage_branches)
        sides = split_sides(node, read) if priors else None  # grown specialists' split sides
        rec.routed.append(Routed(node, rows.idx, c.P, exit_logits, sides))
        if not self.training:
            return rows
        update_alpha(list(node.branches.values()), c.top1, rows.alive, self.options["usage_beta"])
        if not node.has_stop:
            return rows
        stop_here = rows.alive & (c.top1 == len(node.branches) - 1)  # (B_n,)
        rec.stopped.append((node.branches[STOP].node_id, stop_here))
        return rows._replace(alive=rows.alive & ~stop_here)

    def leaf(self, node: TrieNode, f, rows: Rows) -> Leaf:
        """Alg. 1 line 3: the leaf's features, pooled and adapted (§4.1); gated in training."""
        z = self.adapt(f.mean((2, 3)))  # (B_l, W)
        if rows.gate is not None:
            z = z * rows.gate[:, None].to(z.dtype)  # exactly z forward; the selectors' gradient
        return Leaf(node, z, rows)

    def finish(self, rec: Record | None, leaves: list[Leaf], idx) -> Record | None:
        """The record's counts: where the samples ran and, in training, where top-1 sent them (one
        host sync) and the depth of each sample's leaf."""
        if rec is None:
            return None
        ran = {leaf.node.node_id: len(leaf.z) for leaf in leaves}
        if not self.training:
            return rec._replace(leaf_counts=ran, ran_leaf_counts=ran)
        sent = [(leaf.node.node_id, leaf.rows.alive) for leaf in leaves] + rec.stopped
        counts = torch.stack([mask.sum() for _, mask in sent]).tolist()
        depth = torch.cat([torch.full_like(leaf.rows.idx, leaf.node.depth) for leaf in leaves])
        return rec._replace(leaf_counts={k: c for (k, _), c in zip(sent, counts) if c},
                            ran_leaf_counts=ran,  # leaf depths back in batch order: (B,)
                            leaf_depth=depth.new_empty(len(idx)).index_copy(0, idx, depth))

    @property
    def rule(self) -> float | None:
        """The stop rule's threshold (None: Alg. 1's argmax)."""
        return routers.STOP_RULES[self.options["stop_rule"]]

    def set_operating_point(self, t: float | None) -> None:
        """The threshold inference uses (calibrate.calibrate_net chooses it on held-out data)."""
        check_options(self.backbone, 1, **{**self.options, "stop_threshold": t})
        self.options["stop_threshold"] = t

    # ------------------------------------------------------------------------- exits and selectors

    def adapt(self, pooled: torch.Tensor) -> torch.Tensor:
        """The §4.1 1x1 adapter after GAP (they commute: HW x fewer MACs): (B, C) -> (B, W)."""
        key = str(pooled.shape[1])
        return self.adapters[key](pooled) if key in self.adapters else pooled

    def exit(self, f: torch.Tensor) -> torch.Tensor:
        """An exit, the one home of pool -> adapter -> head: (B, C, H, W) -> (B, num_classes)."""
        return self.head(self.adapt(f.mean((2, 3))))

    def reads_exit(self, node: TrieNode) -> bool:
        """Whether `node`'s selector reads its exit: a confidence read or a held-out calibration."""
        return (node.has_stop and len(node.branches) > 1
                and (node.selector.confidence is not None or node.selector.calibrated))

    def signatures(self, node: TrieNode) -> torch.Tensor:
        """Each stage branch's weight signature (§4.1): its sig conv's mean weights -> (K_s, S)."""
        name = self.backbone.stages[node.depth + 1].sig_name
        ws = [k.sub.get_submodule(name).weight for k in node.stage_branches]
        return torch.stack([w.detach().float().mean((1, 2, 3)) for w in ws])

    # ------------------------------------------------------------------------- structure

    def nodes(self, node: TrieNode | None = None):
        """All nodes, pre-order."""
        node = self.root if node is None else node
        yield node
        for k in node.branches.values():
            yield from self.nodes(k)

    def node(self, node_id: str) -> TrieNode:
        root, *parts = node_id.split("/")  # "0/1/stop": the root, then a local branch id per level
        if root != self.root.node_id:
            raise KeyError(node_id)
        return functools.reduce(lambda node, p: node.branches[p], parts, self.root)

    def parent(self, node: TrieNode) -> TrieNode | None:
        return None if node is self.root else self.node(node.node_id.rsplit("/", 1)[0])

    def path(self, node_id: str) -> list[TrieNode]:
        """The nodes from the root to `node_id`, inclusive: what a sample ending there ran."""
        parts = node_id.split("/")
        return [self.node("/".join(parts[:i])) for i in range(1, len(parts) + 1)]

    def leaves(self) -> list[TrieNode]:
        return [n for n in self.nodes() if not n.branches]

    def ensure_adapter(self, channels: int) -> None:
        """A 1x1 adapter to the head width, one per channel count (§4.1); none at head width."""
        if channels != self.backbone.head_width and str(channels) not in self.adapters:
            linear = nn.Linear(channels, self.backbone.head_width)
            self.adapters[str(channels)] = linear.to(self.root.alpha.device)

    def add_child(self, parent: TrieNode, sub=None, local_id: str | None = None) -> TrieNode:
        """Attach a stage-(d+1) branch to `parent` (torchvision's fresh init unless `sub` is
        given). A leaf that gets its first branch gains a stop branch and a selector."""
        d, device = parent.depth + 1, parent.alpha.device
        if d >= len(self.backbone.stages):
            raise ValueError(f"node {parent.node_id} is at the last stage; it cannot have children")
        if local_id is None:
            local_id, parent.next_child = str(parent.next_child), parent.next_child + 1
        sub = self.backbone.stages[d].make() if sub is None else sub
        child = TrieNode(f"{parent.node_id}/{local_id}", d, sub,
                         in_channels=self.backbone.stages[d - 1].channels).to(device)
        stop = parent.branches.pop(STOP) if parent.has_stop else None  # the stop branch stays last
        first = not parent.branches
        parent.branches[local_id] = child
        self.ensure_adapter(self.backbone.stages[d].channels)
        if first and self.options["stop"]:
            stop = TrieNode(f"{parent.node_id}/{STOP}", parent.depth, nn.Identity(), is_stop=True)
        if stop is not None:
            parent.branches[STOP] = stop.to(device)
        self.ensure_selector(parent)
        return child

    def ensure_selector(self, node: TrieNode) -> None:
        """N.PS of the kind `node`'s choice needs (stop or go on alone: `stop_go`), kept if it is of
        that kind already; a new one takes over the old one's stop logit parameters."""
        o, stages = self.options, self.backbone.stages
        stop_go = len(node.branches) == 2 and node.has_stop and o["stop_go"] == "confidence"
        kind = "confidence" if stop_go else o["selector"]
        if len(node.branches) < 2 or type(node.selector) is routers.KINDS[kind]:
            return
        selector = routers.make_selector(kind, stages[node.depth].channels,
                                         stages[node.depth + 1].sig_dim, o["d_model"],
                                         o["n_head"], o["exit_confidence"])
        if node.selector is not None:  # the stop logit's offset, confidence read and calibration
            selector.load_state_dict(node.selector.state_dict(), strict=False)
        node.selector = selector.to(node.alpha.device)

    def remove_child(self, parent: TrieNode, child: TrieNode) -> None:
        """Delete `child` and its subtree (Alg. 3 line 3); a parent left without stage branches is a
        leaf again."""
        del parent.branches[child.node_id.rsplit("/", 1)[1]]
        if not parent.stage_branches:
            parent.branches.clear()
            parent.selector = None
        self.ensure_selector(parent)

    def structure(self) -> dict:
        """The trie as JSON-able data: enough, with the backbone, to rebuild it (from_structure)."""

        def rec(n: TrieNode) -> dict:
            return {"id": n.node_id, "depth": n.depth, "stop": n.is_stop,
                    "next_child": n.next_child, "children": [rec(k) for k in n.branches.values()]}

        return {"format": FORMAT, "backbone": self.backbone.name,
                "num_classes": self.backbone.num_classes, "options": dict(self.options),
                "adapters": [int(c) for c in self.adapters], "root": rec(self.root)}

    @classmethod
    def from_structure(cls, s: dict, backbone) -> "JulietNet":
        """Rebuild the trie of `structure()` on `backbone` (e.g. `make_backbone(s["backbone"],
        s["num_classes"])`); then `load_state_dict` restores the weights and statistics."""
        if s.get("format") != FORMAT:
            raise ValueError(f"the structure's format is {s.get('format')!r}; this code reads "
                             f"{FORMAT!r}")
        if (backbone.name, backbone.num_classes) != (s["backbone"], s["num_classes"]):
            raise ValueError(f"the structure is of {s['backbone']} with {s['num_classes']} "
                             f"classes, the backbone {backbone.name} with {backbone.num_classes}")
        net = cls(backbone, prebuild=1, **{"stop_go": "selector", **s["options"]})  # older runs
        templates, _ = backbone.initial()  # one constructor call; load_state_dict sets the weights
        for c in s["adapters"]:  # first, in their original order: net.parameters() keeps its order
            net.ensure_adapter(c)

        def rec(node: TrieNode, spec: dict) -> None:
            node.next_child = spec["next_child"]
            for c in (c for c in spec["children"] if not c["stop"]):
                sub = copy.deepcopy(templates[c["depth"]])
                rec(net.add_child(node, sub, c["id"].rsplit("/", 1)[1]), c)

        rec(net.root, s["root"])
        return net


FORMAT = "juliet-trie/2"  # /1 named the branches `child`, a stop branch before later stage ones
