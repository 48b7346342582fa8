"""How the selectors learn: the losses of a Juliet training step (paper §2.2, §6.2; and ours).

Each reads the `Record` that a training forward pass returns (routers.py: each routing node's P,
its exit's logits, each sample's leaf depth), and `juliet_loss` adds them to the task loss with the
default recipe's weights:

    logits, record = net(x, return_record=True)
    loss = juliet_loss(net, record, logits, y)  # ours; exit, route, split weights 0: the paper's

  exit_loss           ours: deep supervision of every exit (BranchyNet)
  route_loss          ours: stop decisions as cost-sensitive classification at a price lambda_c
                      of compute, the per-sample twin of §6.2's L = (1 - acc) + lambda c
  split_loss          ours: a grown specialist's parent learns the side of the split it was
                      grown for (grow_prune.grow_split)
  balance_loss        §2.2's load-balancing loss over sibling stage branches
  expected_cost_loss  the expected stage cost under P (compute-aware straight-through routing)
"""

import torch
import torch.nn.functional as F


def gumbel_tau(epoch: int, epochs: int, tau0: float = 1.0, tau_min: float = 0.1) -> float:
    """The Gumbel temperature, annealed geometrically from tau0 to tau_min over training (§3.1.3,
    §5.3's stochastic policy)."""
    return tau0 * (tau_min / tau0) ** (epoch / max(1, epochs - 1))


def exits_of(record) -> list:
    """The routing nodes of a record that have an exit (a stop branch), pre-order."""
    return [r for r in record.routed if r.exit is not None]


def exit_loss(record, y: torch.Tensor) -> torch.Tensor:
    """Deep supervision of the early exits (BranchyNet; ours): the cross-entropy of every exit
    (GAP, adapter, head) on all samples that reached its node, stopping there or not, averaged over
    exits. A stop decision is only as good as its exit; in full-depth training every exit learns
    from every sample."""
    terms = [F.cross_entropy(r.exit, y[r.idx]) for r in exits_of(record)]
    return torch.stack(terms).mean() if terms else torch.zeros((), device=y.device)


def route_loss(net, record, logits, y: torch.Tensor, cost_weight: float = 0.05) -> torch.Tensor:
    """Stop decisions as cost-sensitive classification (ours), per sample: §6.2's
    L = (1 - acc) + lambda c.

    Along a sample's path, stopping at node k costs e_k + lambda_c C_k (e_k = 1 if exit k is wrong;
    C_k the MACs of the stages up to k over the static backbone's). Going on is worth V_{k+1}, the
    same cost expected under the current policy further down (computed backwards from the leaf
    that ran, detached). The gain of stopping, g = V_{k+1} - (e_k + lambda_c C_k), weighs a binary
    cross-entropy on P_stop: "stop" with weight g where g > 0, "go on" with weight -g where g < 0.
    Its minimiser, P_stop = E[g+] / (E[g+] + E[g-]) among samples that look alike, stops exactly
    where stopping lowers the expected cost, and stays graded: a threshold on it is the compute
    knob. `cost_weight` is lambda_c, in accuracy per backbone's worth of MACs (0.05: one point of
    top-1 weighs as much as 20% of the static compute). Full-depth training knows every e_k; in
    routed training a sample that stopped has no continuation, and its gain there is 0."""
    B, hw = record.input_shape
    macs = net.backbone.stage_macs(hw)
    D, exits = len(macs), exits_of(record)
    cost = cost_weight * torch.tensor(macs, device=logits.device).cumsum(0) / sum(macs)  # (D,)
    gain = stop_gains(exits, logits, y, record.leaf_depth, cost, B, D)  # (B, D)
    terms = []
    for r in exits:
        g, p = gain[r.idx, r.node.depth], r.P[:, -1].clamp(1e-6, 1 - 1e-6)  # (B_n,)
        terms.append(-(g.clamp(min=0) * p.log() + (-g).clamp(min=0) * torch.log1p(-p)).sum())
    return torch.stack(terms).sum() / B if terms else torch.zeros((), device=logits.device)


@torch.no_grad()
def stop_gains(exits: list, logits, y, leaf_depth, cost, B: int, D: int) -> torch.Tensor:
    """route_loss's g: (B, D), the gain of stopping at depth d under the current policy (0 where a
    sample's path has no exit at d), backwards from the leaf that ran, one step per depth."""
    err, p_stop = torch.zeros(B, D, device=logits.device), torch.zeros(B, D, device=logits.device)
    seen = torch.zeros(B, D, dtype=torch.bool, device=logits.device)
    for r in exits:  # r.idx (B_n,), r.exit (B_n, classes), r.P (B_n, K), the stop branch last
        err[r.idx, r.node.depth] = (r.exit.argmax(-1) != y[r.idx]).float()
        p_stop[r.idx, r.node.depth], seen[r.idx, r.node.depth] = r.P[:, -1].float(), True
    V = (logits.argmax(-1) != y).float() + cost[leaf_depth]  # (B,) the leaf that ran
    gain = torch.zeros(B, D, device=logits.device)
    for d in reversed(range(D)):  # backwards along every path at once
        here = err[:, d] + cost[d]
        gain[:, d] = torch.where(seen[:, d], V - here, 0.0)
        V = torch.where(seen[:, d], p_stop[:, d] * here + (1 - p_stop[:, d]) * V, V)
    return gain


def split_loss(record) -> torch.Tensor:
    """Ours (grow_prune.grow_split): each grown specialist's parent learns which samples are the
    specialist's: the binary cross-entropy of its share of the stage branches' P (the stop branch
    left out) against the side of the split it was grown for, averaged; 0 where none was grown."""
    terms = []
    for r in (r for r in record.routed if r.sides is not None):
        M = len(r.sides)
        share = r.P[:, :M] / r.P[:, :M].sum(1, keepdim=True)  # (B_n, M) over the stage branches
        p = share.clamp(1e-6, 1 - 1e-6)  # a NaN share stays NaN: the step reports a non-finite loss
        terms += [-(side * p[:, k].log() + (1 - side) * (1 - p[:, k]).log()).mean()
                  for k, side in enumerate(r.sides) if side is not None]
    return torch.stack(terms).mean() if terms else torch.zeros((), device=record.leaf_depth.device)


def balance_loss(record) -> torch.Tensor:
    """§2.2's load-balancing loss M sum_m (f_m - 1/M)^2 over the M sibling stage branches of each
    node that has several (f_m: the mean of P renormalised over them), averaged over those nodes.
    The stop branch is left out: how many samples stop is route_loss's business."""
    terms = []
    for r in record.routed:
        M = len(r.node.stage_branches)
        if M > 1:
            f = (r.P[:, :M] / r.P[:, :M].sum(1, keepdim=True)).mean(0)  # (M,) the siblings' shares
            terms.append(M * (f - 1.0 / M).pow(2).sum())
    return torch.stack(terms).mean() if terms else torch.zeros((), device=record.leaf_depth.device)


def expected_cost_loss(net, record) -> torch.Tensor:
    """The expected per-sample stage cost under the selectors' P, over the static backbone's: each
    decision adds sum_j P_j c_j (c_j the MACs of branch j's stage, 0 for a stop branch); the stem,
    which every sample runs, is a constant. Differentiable in P: §6.2's lambda c in training."""
    B, hw = record.input_shape
    macs = net.backbone.stage_macs(hw)
    total = torch.tensor(macs[0] * B, device=net.root.alpha.device)
    for r in record.routed:
        kids = r.node.branches.values()
        c = torch.tensor([0.0 if k.is_stop else macs[k.depth] for k in kids], device=r.P.device)
        total = total + (r.P @ c).sum()
    return total / (B * sum(macs))


def juliet_loss(net, record, logits, y: torch.Tensor, exit_weight=1.0, route_weight=1.0,
                cost_weight=0.05, split_weight=1.0, balance_weight=0.0,
                expected_cost_weight=0.0) -> torch.Tensor:
    """The training objective of a Juliet step: the task loss plus each loss that has a weight. The
    defaults are our recipe; `exit_weight=0, route_weight=0, split_weight=0` is the paper's."""
    loss = F.cross_entropy(logits, y)
    if exit_weight:  # deep supervision of the early exits
        loss = loss + exit_weight * exit_loss(record, y)
    if route_weight:  # stop decisions on the expected loss of their policy, at a price of compute
        loss = loss + route_weight * route_loss(net, record, logits, y, cost_weight=cost_weight)
    if expected_cost_weight:  # compute-aware straight-through routing
        loss = loss + expected_cost_weight * expected_cost_loss(net, record)
    if balance_weight:  # §2.2 load balancing of sibling stage branches
        loss = loss + balance_weight * balance_loss(record)
    if split_weight:  # grown specialists get the side of the split they were grown for
        loss = loss + split_weight * split_loss(record)
    return loss
