"""Online topology for Juliet: variance-triggered growth (Algorithm 2) and EMA pruning (Algorithm 3).

Paper §3.1.1 (Eq. 2, Eq. 3), §4.2, §4.3. A training loop calls

    events += grow(net, cfg, step, record.leaf_counts, optimizer)  # after every mini-batch; acts every grow_every
    events += end_epoch(net, cfg, epoch, step, optimizer)          # after every epoch; sweeps every prune_every

Both return one record per event: {"kind", "node", "step", "statistic", "value", "threshold"}.
Both keep the optimizer in step with the trie (`sync_optimizer`): a grown child's parameters are
learned from the next step on, and a pruned subtree's parameters leave the optimizer with their state.

Growth (Alg. 2) happens at the leaf L reached by most samples of the last training batch (the batched
reading of "traverse ... to the deepest active node on the current input", §4.2): if L's EMA sigma^2
exceeds theta_grow, one freshly initialised child with alpha = 0 is attached, at most M_max stage
children per node. It goes under L when L can deepen (depth < max_depth); a leaf at the last stage
grows a sibling instead, a fresh copy of its own stage ("the same sub-module family as L"), and a stop
leaf grows at its parent, whose features it shares. Without that, a prebuilt full-depth chain, whose
busiest leaf is the last stage, could never grow.

Pruning (Alg. 3): each epoch, a child whose EMA usage alpha is below theta_prune has its age counter
incremented (otherwise reset). Every E_prune epochs a sweep deletes each stage child whose counter
reached t_min, with its subtree, if a sibling's did not. The root and stop children are never pruned.
After training, `prune_unvisited` (ours) applies the same rule once to the kept trie on validation traffic.
alpha's EMA decay is per step; train_cifar.py sets it so that alpha forgets within a quarter epoch
(`--usage-horizon`), so that t_min and E_prune, in epochs, mean the same on a small data set as on CIFAR-10.

Split growth (ours, `statistic="split"`; README "Paper notes and deviations"). sigma^2 on unit-norm features
measures how spread a node's outputs are, which grows with depth whatever the data (0.06 at the stem to 0.6
at layer 4 of a trained ResNet-18, on one domain or two), so θ_grow = 0.4 can only fire at the last stage. The
split share (trie.update_split) measures instead how well one 2-way split explains a node's *inputs*: on real
digits it stays below 0.35 at every node; mixed with MNIST it is 0.4-0.75 at the nodes before layer 3, and the
split is the domain. Every `grow_every` steps the node with the highest share above θ_grow gets a sibling
with a *prior*: the far side of that split (its mean and direction), from which losses.split_loss teaches
the parent's selector which samples are the newcomer's. The newcomer takes half its source's alpha (so Alg. 3
does not prune it before it has had traffic), and both shares restart.

A grown child is a freshly initialised stage (Alg. 2 line 3); the copies of a stage or subtree that earlier
releases offered lost their ablation (docs/results.md).
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: this file runs with any object that has JulietNet's structure methods
    from trie import JulietNet, TrieNode

MODES = ("both", "grow-only", "prune-only", "off")  # §5.3 ablation; "off" is static Juliet
STATISTICS = ("sigma2", "split")  # growth trigger: §4.2's sigma^2 at the busiest leaf; ours, the inputs' split share


@dataclass
class GrowPruneConfig:
    mode: str = "both"
    theta_grow: float = 0.4    # Table 2 (CIFAR-10); Table 3 uses 0.5 (ImageNet)
    theta_prune: float = 0.1   # Tables 2 and 3
    grow_every: int = 10       # mini-batches between growth attempts (Table 3; not given for CIFAR)
    prune_every: int = 3       # E_prune, epochs between sweeps (Table 2; Table 3 uses 5)
    t_min: int = 3             # epochs a child's alpha must stay below theta_prune (Alg. 3)
    m_max: int = 3             # M_max, stage children per node (Alg. 2); not given in the paper
    max_depth: int | None = None  # deepest node depth; None: the backbone's last stage
    statistic: str = "sigma2"  # "split": ours, the node's inputs' split share

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("statistic", STATISTICS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown grow/prune {name} {getattr(self, name)!r}; "
                                 f"choose one of: {', '.join(allowed)}")
        for name in ("theta_grow", "theta_prune"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("grow_every", "prune_every", "t_min", "m_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")


def _event(kind: str, node: "TrieNode", step: int, statistic: str, value: float, threshold: float) -> dict:
    return {"kind": kind, "node": node.node_id, "step": step, "statistic": statistic,
            "value": round(value, 6), "threshold": threshold}


def sync_optimizer(optimizer: torch.optim.Optimizer, net: "JulietNet") -> None:
    """Make the optimizer's single param group equal `net.parameters()`, in that order.

    New parameters join (their state is created on their first step); parameters no longer in the net leave,
    with their state. One group keeps a scheduler's per-group learning rate valid for grown children, and the fixed
    order lets a checkpointed optimizer load into a rebuilt net.
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError("sync_optimizer expects an optimizer with one param group over net.parameters()")
    params = list(net.parameters())
    alive = set(params)
    for p in [p for p in optimizer.state if p not in alive]:
        del optimizer.state[p]
    optimizer.param_groups[0]["params"] = params


def grow(net: "JulietNet", cfg: GrowPruneConfig, step: int, leaf_counts: dict, optimizer=None) -> list[dict]:
    """Algorithm 2 every `cfg.grow_every` steps, at the leaf the last training batch's decisions sent most samples
    to (`leaf_counts`: its `Record.leaf_counts`, summed over the ranks under torchrun)."""
    if cfg.mode not in ("both", "grow-only") or step % cfg.grow_every or not leaf_counts:
        return []
    if cfg.statistic == "split":
        return split(net, cfg, step, optimizer)
    leaf = net.node(max(leaf_counts, key=leaf_counts.get))
    max_depth = min(len(net.backbone.stages) - 1, math.inf if cfg.max_depth is None else cfg.max_depth)
    # Where the new child goes: under the leaf if it can deepen; otherwise it becomes the leaf's sibling,
    # "a child of the same sub-module family as L" (Alg. 2 line 2). A stop leaf shares its parent's
    # features and stage, so it always grows at the parent.
    node = leaf if not leaf.is_stop and leaf.depth < max_depth else net.parent(leaf)
    sigma2 = float(net.parent(leaf).sigma2 if leaf.is_stop else leaf.sigma2)
    # Alg. 2 line 1, with the depth bound: a child lives one stage below its parent.
    if node is None or not (sigma2 > cfg.theta_grow and len(node.stage_children) < cfg.m_max
                            and node.depth < max_depth):
        return []
    child = net.add_child(node)  # lines 2-4: torchvision's fresh init, alpha = 0
    if optimizer is not None:
        sync_optimizer(optimizer, net)
    return [_event("grow", child, step, "sigma2", sigma2, cfg.theta_grow)]


def split(net: "JulietNet", cfg: GrowPruneConfig, step: int, optimizer=None) -> list[dict]:
    """Split growth (ours): a sibling beside the node whose inputs a 2-way split explains best, above θ_grow (the
    shares are the same on every rank under torchrun); the newcomer's prior is the split's far side."""
    room = [k for k in net.nodes() if k is not net.root and not k.is_stop
            and len(net.parent(k).stage_children) < cfg.m_max]
    node = max(room, key=lambda k: float(k.split_share), default=None)
    if node is None or not float(node.split_share) > cfg.theta_grow:
        return []
    share, parent = float(node.split_share), net.parent(node)
    child = net.add_child(parent)
    child.prior = node.principal.clone()  # samples with (u - mean)·v > 0 are the newcomer's
    node.alpha.div_(2), child.alpha.copy_(node.alpha)  # it takes about half of them: Alg. 3 must not see a newborn
    for k in parent.stage_children:  # the shares restart: each sibling's inputs are now its side's
        k.split_share.zero_()
        k.principal.zero_()
    if optimizer is not None:
        sync_optimizer(optimizer, net)
    return [_event("grow", child, step, "split_share", share, cfg.theta_grow)]


def prune_sweep(net: "JulietNet", cfg: GrowPruneConfig, step: int, optimizer=None) -> list[dict]:
    """Algorithm 3: delete each stage child whose alpha stayed below theta_prune for t_min epochs while a sibling
    did not. Where every stage child is idle, the node's samples chose our stop child, which the paper's trie
    has not (there a lone child takes every sample): deleting them would cut the depth of those that go on."""
    events = []

    def sweep(node: "TrieNode") -> None:
        idle = [kid for kid in node.stage_children if int(kid.low_epochs) >= cfg.t_min]
        for kid in node.stage_children:
            if kid in idle and len(idle) < len(node.stage_children):
                events.append(_event("prune", kid, step, "alpha", float(kid.alpha), cfg.theta_prune))
                net.remove_child(node, kid)  # line 3, with its subtree
            else:
                sweep(kid)  # line 5

    sweep(net.root)
    if events and optimizer is not None:
        sync_optimizer(optimizer, net)
    return events


def prune_unvisited(net: "JulietNet", reach: dict, theta_prune: float, step: int) -> list[dict]:
    """Alg. 3 once more, on held-out traffic (ours; README "Paper notes and deviations", `--prune-kept`).

    Alg. 3 prunes on the training EMA alpha after t_min low epochs, which a checkpoint kept for its validation
    score may not have had: on real data the best epoch can be the one a sibling grew in, before any sample
    went there. Here a sibling that gets less than theta_prune of what its parent sends to its stage children
    in `reach` (a validation split's samples through each node: measure.node_visits) goes with its subtree. A
    node none of these samples passed is left alone (no evidence), and the last stage child is never deleted.
    """
    events = []

    def sweep(node: "TrieNode") -> None:
        total = sum(reach.get(kid.node_id, 0) for kid in node.stage_children)
        for kid in node.stage_children:
            share = reach.get(kid.node_id, 0) / max(total, 1)
            if total and share < theta_prune and len(node.stage_children) > 1:
                events.append(_event("prune", kid, step, "val_share", share, theta_prune))
                net.remove_child(node, kid)
            else:
                sweep(kid)

    sweep(net.root)
    return events


@torch.no_grad()
def end_epoch(net: "JulietNet", cfg: GrowPruneConfig, epoch: int, step: int, optimizer=None) -> list[dict]:
    """Age every child's low-usage counter, then run the sweep every `cfg.prune_every` epochs (1-based)."""
    for node in net.nodes():
        if node is not net.root and not node.is_stop:
            low = bool(node.alpha < cfg.theta_prune)
            node.low_epochs.copy_(node.low_epochs + 1 if low else torch.zeros_like(node.low_epochs))
    if cfg.mode not in ("both", "prune-only") or epoch % cfg.prune_every:
        return []
    return prune_sweep(net, cfg, step, optimizer)
