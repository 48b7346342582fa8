"""Online topology: variance-triggered growth (Algorithm 2) and EMA pruning (Algorithm 3).

Paper §3.1.1 (Eq. 2, Eq. 3), §4.2, §4.3. A training loop calls

    events += grow(net, cfg, step, record.leaf_counts, opt)  # every step; acts every grow_every
    events += end_epoch(net, cfg, epoch, step, opt)          # every epoch; sweeps every prune_every

Both return one dict per event ({"kind", "node", "step", "statistic", "value", "threshold"}), and
both keep the optimizer in step with the trie (`sync_optimizer`): a grown child's parameters learn
from the next step on, a pruned subtree's leave the optimizer with their state.

Alg. 2 line by line, in `grow`:
    line 1     sigma^2_L > theta_grow and |L.children| < M_max   the test, L the busiest leaf
    lines 2-4  a fresh child of L's family, alpha = 0, attached  JulietNet.add_child
"The current leaf" of a batch is the leaf most of its samples reached. A leaf that can deepen gets a
next-stage child; a leaf at the last stage (or at max_depth) grows a sibling of its own stage ("the
same sub-module family as L"), so that a prebuilt full-depth chain can grow; a stop leaf grows at
its parent.

Alg. 3 line by line, in `prune_sweep`, every E_prune epochs (`end_epoch`):
    line 2     alpha_C < theta_prune for the last t_min epochs   `low_epochs`, counted by end_epoch
    line 3     C removed, with its subtree                        JulietNet.remove_child
    line 5     PRUNESWEEP(C)                                      the recursion
The root and stop branches are never pruned, and a node keeps its stage branches when all are
idle: its samples chose our stop branch, which the paper's trie has not. Alg. 1 line 6's alpha is
`update_alpha`, which the forward pass calls.

Ours, each with a switch (README "Paper notes and deviations"):
  grow_statistic     "split". sigma^2 on unit-norm features grows with depth whatever the data
                     (0.06 at the stem to 0.6 at layer 4 of a trained ResNet-18), so theta_grow =
                     0.4 can only fire at the last stage. The split share of a node's *inputs*
                     (the share of their variance one 2-way split explains) is < 0.35 on one
                     source of digits and 0.4-0.75 before layers 1-3 when MNIST is mixed in. The
                     node with the highest share above theta_grow gets a sibling whose *prior* is
                     the split's far side; losses.split_loss teaches the parent which samples are
                     the newcomer's.
  usage_horizon      alpha forgets within this many epochs (`usage_decay`), so that t_min and
                     E_prune, in epochs, mean on a small data set what they mean on CIFAR-10.
  prune_kept         `prune_unvisited`: Alg. 3 once more after training, on validation traffic.

`track_growth` is what the forward pass records for growth: sigma^2 and the split share.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: nothing here imports the trie
    from trie import JulietNet, TrieNode

MODES = ("both", "grow-only", "prune-only", "off")  # §5.3's ablation; "off" is static Juliet
STATISTICS = ("sigma2", "split")  # §4.2's sigma^2 at the busiest leaf; ours, the inputs' split


@dataclass
class GrowPruneConfig:
    """Alg. 2-3's settings. The defaults are our recipe; the paper's is `grow_prune="both",
    grow_statistic="sigma2", usage_horizon=0.0, prune_kept=False`."""

    grow_prune: str = "off"  # §5.3's modes; ours: off (README)
    theta_grow: float = 0.4  # Table 2 (CIFAR-10); Table 3: 0.5 (ImageNet)
    theta_prune: float = 0.1  # Tables 2 and 3
    grow_every: int = 10  # mini-batches between growth attempts (Table 3; Table 2 gives none)
    prune_every: int = 3  # E_prune, epochs between sweeps (Table 2; Table 3: 5)
    t_min: int = 3  # epochs alpha must stay below theta_prune (Alg. 3); the paper gives none
    m_max: int = 3  # M_max, stage branches per node (Alg. 2); the paper gives none
    max_depth: int | None = None  # deepest node depth; None: the backbone's last stage
    grow_statistic: str = "split"  # ours; "sigma2": §4.2's
    usage_horizon: float = 0.25  # ours: epochs over which alpha forgets; 0: `beta` per step
    prune_kept: bool = True  # ours: prune the kept trie on validation traffic

    def __post_init__(self):
        for name, allowed in (("grow_prune", MODES), ("grow_statistic", STATISTICS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; "
                                 f"choose one of: {', '.join(allowed)}")
        for name in ("theta_grow", "theta_prune"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("grow_every", "prune_every", "t_min", "m_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if not 0.0 <= self.usage_horizon < math.inf:
            raise ValueError(f"usage_horizon must be >= 0, got {self.usage_horizon}")

    @property
    def prunes(self) -> bool:
        """Whether Alg. 3 runs in this mode (§5.3)."""
        return self.grow_prune in ("both", "prune-only")


def usage_decay(cfg: GrowPruneConfig, steps_per_epoch: int) -> float | None:
    """alpha's EMA decay per step, for JulietNet(usage_beta=): 1 - 1 / (usage_horizon x steps per
    epoch): 0.989 on CIFAR-10 at batch 128, 0.78 at 18 steps an epoch; at 0, None (the net's beta).
    """
    if not cfg.usage_horizon:
        return None
    return 1 - 1 / max(1.0, cfg.usage_horizon * steps_per_epoch)


def sync_optimizer(optimizer: torch.optim.Optimizer, net: "JulietNet") -> None:
    """The optimizer's single param group made equal to `net.parameters()`, in order: new
    parameters join (their state starts at their first step), those no longer in the net leave
    with their state. One group keeps a scheduler valid for grown children; the order lets a
    checkpoint load."""
    if len(optimizer.param_groups) != 1:
        raise ValueError("sync_optimizer expects one param group over net.parameters()")
    params = list(net.parameters())
    alive = set(params)
    for p in [p for p in optimizer.state if p not in alive]:
        del optimizer.state[p]
    optimizer.param_groups[0]["params"] = params


def event(kind: str, node: "TrieNode", step: int, statistic: str, value: float, threshold: float):
    return {"kind": kind, "node": node.node_id, "step": step, "statistic": statistic,
            "value": round(value, 6), "threshold": threshold}


# ----------------------------------------------------------------------------- Algorithm 2


def grow(net: "JulietNet", cfg: GrowPruneConfig, step: int, leaf_counts: dict, optimizer=None):
    """Alg. 2 every `cfg.grow_every` steps, at the leaf the last batch's decisions sent most samples
    to (`leaf_counts`: its Record's, summed over the ranks under torchrun). Returns its events."""
    if cfg.grow_prune not in ("both", "grow-only") or step % cfg.grow_every or not leaf_counts:
        return []
    if cfg.grow_statistic == "split":
        return grow_split(net, cfg, step, optimizer)
    leaf = net.node(max(leaf_counts, key=leaf_counts.get))
    deepest = len(net.backbone.stages) - 1
    max_depth = deepest if cfg.max_depth is None else min(deepest, cfg.max_depth)
    # under the leaf if it can deepen, else beside it; a stop leaf shares its parent's features
    node = leaf if not leaf.is_stop and leaf.depth < max_depth else net.parent(leaf)
    sigma2 = float(net.parent(leaf).sigma2 if leaf.is_stop else leaf.sigma2)
    room = node is not None and len(node.stage_branches) < cfg.m_max and node.depth < max_depth
    if not (sigma2 > cfg.theta_grow and room):  # line 1, with the depth bound
        return []
    child = net.add_child(node)  # lines 2-4: torchvision's fresh init, alpha = 0
    if optimizer is not None:
        sync_optimizer(optimizer, net)
    return [event("grow", child, step, "sigma2", sigma2, cfg.theta_grow)]


def grow_split(net: "JulietNet", cfg: GrowPruneConfig, step: int, optimizer=None) -> list[dict]:
    """Ours: a sibling beside the node whose inputs one 2-way split explains best, above
    theta_grow (the shares agree on every rank under torchrun); its prior is the far side."""
    room = [k for k in net.nodes() if k is not net.root and not k.is_stop
            and len(net.parent(k).stage_branches) < cfg.m_max]
    node = max(room, key=lambda k: float(k.split_share), default=None)
    if node is None or not float(node.split_share) > cfg.theta_grow:
        return []
    share, parent = float(node.split_share), net.parent(node)
    child = net.add_child(parent)
    child.prior = node.principal.clone()  # samples with (u - mean)·v > 0 are the newcomer's
    node.alpha.div_(2), child.alpha.copy_(node.alpha)  # half the traffic: Alg. 3 spares a newborn
    for k in parent.stage_branches:  # the shares restart: each sibling's inputs are now its side's
        k.split_share.zero_()
        k.principal.zero_()
    if optimizer is not None:
        sync_optimizer(optimizer, net)
    return [event("grow", child, step, "split_share", share, cfg.theta_grow)]


@torch.no_grad()
def track_growth(node: "TrieNode", x: torch.Tensor, f: torch.Tensor, beta: float) -> None:
    """What growth reads, recorded by the forward pass: sigma^2 of the node's outputs f (§4.2) and
    the split share of its inputs x (ours; the root's, of the images, is never read). Not on stop
    branches or lone samples."""
    if not node.is_stop and f.shape[0] > 1:
        update_sigma2(node, f, beta)
        update_split(node, x, beta)


def update_sigma2(node: "TrieNode", f: torch.Tensor, beta: float) -> None:
    """Eq. 2 on unit-norm GAP features: mean ||u_i - mean u||^2 = 1 - ||mean u||^2, in [0, 1]."""
    u = F.normalize(f.float().mean((2, 3)), dim=1)  # (B_n, C)
    s2 = (u - u.mean(0)).pow(2).sum(1).mean()
    node.sigma2.mul_(beta).add_((1 - beta) * s2)


def update_split(node: "TrieNode", x: torch.Tensor, beta: float) -> None:
    """Ours: the share of the node's input variance one 2-way split explains, EMA'd into
    `split_share` (in [0, 1]): unit-norm GAP inputs u split by the sign of (u - mean)·v, v their
    top direction (Oja: one power step a batch)."""
    u = F.normalize(x.float().mean((2, 3)), dim=1)  # (B_n, C)
    d = u - u.mean(0)
    mean, v = node.principal
    if not v.any():  # first batch: its exact top direction, its sign fixed (ranks average them)
        top = torch.linalg.svd(d, full_matrices=False)[2][0]
        v.copy_(top * top[top.abs().argmax()].sign())
        mean.copy_(u.mean(0))
    mean.mul_(beta).add_((1 - beta) * u.mean(0))
    v.copy_(F.normalize(beta * v + (1 - beta) * F.normalize(d.T @ (d @ v), dim=0), dim=0))
    sides = ((d @ v) > 0, (d @ v) <= 0)
    between = sum(s.sum() * d[s].mean(0).pow(2).sum() for s in sides if s.any())
    node.split_share.mul_(beta).add_((1 - beta) * between / d.pow(2).sum().clamp(min=1e-12))


@torch.no_grad()
def update_alpha(kids: list["TrieNode"], top1: torch.Tensor, alive: torch.Tensor, beta: float):
    """Alg. 1 line 6 and Eq. 3 (Alg. 1's lambda is 1 - beta): alpha <- beta alpha + (1 - beta) x
    the share of the node's samples that choose the branch (one update a batch; `alive`: the
    samples top-1 sends to the node)."""
    w = alive.float()  # (B_n,) the samples top-1 sends to this node
    frac = torch.bincount(top1, weights=w, minlength=len(kids)) / w.sum().clamp(min=1)  # (K,)
    for kid, share in zip(kids, frac):
        kid.alpha.copy_(torch.where(w.sum() > 0, beta * kid.alpha + (1 - beta) * share, kid.alpha))


@torch.no_grad()
def split_sides(node: "TrieNode", f: torch.Tensor) -> list[torch.Tensor | None]:
    """Per stage branch of `node`: 1 for the samples its split prior sends it, else 0 (B_n,); None
    where it has no prior. What losses.split_loss teaches the parent's selector."""
    u = F.normalize(f.detach().float().mean((2, 3)), dim=1)  # (B_n, C)
    return [((u - k.prior[0]) @ k.prior[1] > 0).float() if k.prior.any() else None
            for k in node.stage_branches]


# ----------------------------------------------------------------------------- Algorithm 3


@torch.no_grad()
def end_epoch(net: "JulietNet", cfg: GrowPruneConfig, epoch: int, step: int, optimizer=None):
    """Age every child's low-usage counter (Alg. 3 line 2's "for the last t_min epochs"), then run
    the sweep every `cfg.prune_every` epochs (1-based). Returns its events."""
    for node in net.nodes():
        if node is not net.root and not node.is_stop:
            low = bool(node.alpha < cfg.theta_prune)
            node.low_epochs.copy_(node.low_epochs + 1 if low else torch.zeros_like(node.low_epochs))
    if not cfg.prunes or epoch % cfg.prune_every:
        return []
    return prune_sweep(net, cfg, step, optimizer)


def prune_sweep(net: "JulietNet", cfg: GrowPruneConfig, step: int, optimizer=None) -> list[dict]:
    """Alg. 3: delete each stage branch whose alpha stayed below theta_prune for t_min epochs while
    a sibling's did not (where all are idle, their samples chose the stop branch: deleting them
    would cut the depth of those that go on)."""
    events = []

    def sweep(node: "TrieNode") -> None:
        idle = [kid for kid in node.stage_branches if int(kid.low_epochs) >= cfg.t_min]
        for kid in node.stage_branches:  # line 1
            if kid in idle and len(idle) < len(node.stage_branches):  # line 2
                events.append(event("prune", kid, step, "alpha", float(kid.alpha), cfg.theta_prune))
                net.remove_child(node, kid)  # line 3, with its subtree
            else:
                sweep(kid)  # line 5

    sweep(net.root)
    if events and optimizer is not None:
        sync_optimizer(optimizer, net)
    return events


def prune_unvisited(net: "JulietNet", cfg: GrowPruneConfig, reach: dict, step: int) -> list[dict]:
    """Alg. 3 once more, on held-out traffic (ours, `prune_kept`). The kept checkpoint is the best
    validation epoch, which can be the epoch a sibling grew in, before Alg. 3's t_min epochs could
    pass. A branch that gets less than theta_prune of what its parent sends to its stage branches in
    `reach` (a validation split's samples through each node) goes with its subtree. A node nobody
    passed is left alone (no evidence), and a lone stage branch is never deleted."""
    events = []
    if not (cfg.prune_kept and cfg.prunes):
        return events

    def sweep(node: "TrieNode") -> None:
        total = sum(reach.get(kid.node_id, 0) for kid in node.stage_branches)
        for kid in node.stage_branches:
            share = reach.get(kid.node_id, 0) / max(total, 1)
            if total and share < cfg.theta_prune and len(node.stage_branches) > 1:
                events.append(event("prune", kid, step, "val_share", share, cfg.theta_prune))
                net.remove_child(node, kid)
            else:
                sweep(kid)

    sweep(net.root)
    return events
