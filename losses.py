"""How the selectors learn: the routing losses of a Juliet training step (paper §2.2, §6.2; and ours).

Each is a function of the `trie.Record` a training forward pass returns (each decision's P, each exit's logits,
each sample's leaf depth), added to the task loss by the training loop:

    logits, record = net(x, return_record=True)
    loss = (F.cross_entropy(logits, y) + w_exit * exit_loss(record, y)
            + w_route * route_loss(net, record, logits, y, cost_weight=lambda_c) + w_bal * balance_loss(record))
    loss = juliet_loss(net, record, logits, y)  # the same, with the training script's default weights

  route_loss    ours: stop decisions as cost-sensitive classification at a price lambda_c of compute --
                the per-sample twin of §6.2's L = (1 - acc) + lambda c
  exit_loss     ours: deep supervision of every exit (BranchyNet-style)
  expected_cost_loss  expected stage cost under P (compute-aware straight-through routing)
  balance_loss  §2.2's load-balancing loss over sibling stage children
  split_loss    ours: a grown specialist's parent learns the side of the split it was grown for
  freeze_selectors  a routing warm-up: selectors frozen while stages and exits learn
"""

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def gumbel_tau(epoch: int, epochs: int, tau0: float = 1.0, tau_min: float = 0.1) -> float:
    """Gumbel temperature annealed geometrically from tau0 to tau_min over training (§3.1.3, §5.3)."""
    return tau0 * (tau_min / tau0) ** (epoch / max(1, epochs - 1))


def freeze_selectors(net, frozen: bool) -> None:
    """Routing warm-up (ours): frozen selectors keep a new trie at full depth (negative stop bias), so the
    stages and exits learn before the straight-through signal, noise until then, can move any route."""
    for node in net.nodes():
        if node.selector is not None:
            node.selector.requires_grad_(not frozen)


def stage_macs(net, hw: tuple[int, int]) -> list[float]:
    """MACs of each stage at input size `hw`, counted once with torch's FlopCounterMode (FLOPs / 2)."""
    if hw not in net.stage_macs_cache:
        with torch.random.fork_rng(devices=[]):  # building modules draws random weights: not from our stream
            stages, _ = net.backbone.initial()
        x, macs = torch.zeros(1, net.backbone.in_channels, *hw), []
        with torch.no_grad():
            for s in stages:
                with FlopCounterMode(display=False) as counter:
                    x = s.eval()(x)
                macs.append(counter.get_total_flops() / 2)
        net.stage_macs_cache[hw] = macs
    return net.stage_macs_cache[hw]


def expected_cost_loss(net, record) -> torch.Tensor:
    """Expected per-sample stage cost under the selectors' P, as a fraction of the static backbone's.

    Each routing decision adds sum_j P_j c_j, c_j = MACs of child j's stage (0 for a stop child); the stem,
    which every sample runs, is a constant. Differentiable in P: the training-time twin of the §6.2
    objective L = (1 - acc) + lambda c.
    """
    B, hw = record.input_shape
    macs = stage_macs(net, hw)
    total = torch.tensor(macs[0] * B, device=net.root.alpha.device)
    for node, P in record.decisions:
        c = torch.tensor([0.0 if k.is_stop else macs[k.depth] for k in node.choices], device=P.device)
        total = total + (P @ c).sum()
    return total / (B * sum(macs))


def exit_loss(record, y: torch.Tensor) -> torch.Tensor:
    """Deep supervision of the early exits (BranchyNet-style; ours, not the paper's): the cross-entropy of
    every stop child's classifier (GAP, adapter, head) on all samples that reached its parent, whether
    they stopped there or not, averaged over exits. A stop decision is only as good as the exit it
    stops at; in full-depth training every exit learns from every sample."""
    terms = [F.cross_entropy(exit_logits, y[idx]) for _, idx, exit_logits, _ in record.exits]
    return torch.stack(terms).mean() if terms else torch.zeros((), device=y.device)


def route_loss(net, record, logits: torch.Tensor, y: torch.Tensor, cost_weight: float = 0.05) -> torch.Tensor:
    """Stop decisions as cost-sensitive classification (ours): the per-sample twin of §6.2's L = (1 - acc) + lambda c.

    Along a sample's path, stopping at node k costs e_k + lambda_c C_k: e_k = 1 if exit k is wrong (0-1, as
    §6.2's accuracy), C_k the MACs of the stages up to k as a fraction of the static backbone's. Continuing
    is worth V_{k+1}, the same cost expected under the current policy further down (computed backwards
    from the leaf that ran, detached). The gain of stopping, g = V_{k+1} - (e_k + lambda_c C_k), weighs a
    binary cross-entropy on P_stop: target "stop" with weight g where g > 0, "go on" with weight -g where
    g < 0. Its minimiser is P_stop = E[g+] / (E[g+] + E[g-]) among samples that look alike, so top-1
    (P_stop > 1/2 with one stage child) stops exactly where stopping lowers the expected cost, and P_stop
    stays graded: a threshold t on it is the compute knob. Easy samples learn to stop early, hard ones
    to go deep. `cost_weight` is lambda_c in accuracy per backbone-worth of MACs (0.05: one point of top-1 weighs
    as much as 20% of the static compute).

    Full-depth training knows every e_k of every sample. In routed training (the paper's) a sample that
    stopped has no continuation: its gain there is 0, so a sample sent out early is never called back.
    """
    B, hw = record.input_shape
    D, macs = len(net.backbone.stages), stage_macs(net, hw)
    cost = cost_weight * torch.tensor(macs, device=logits.device).cumsum(0) / sum(macs)  # (D,) lambda_c C_k
    with torch.no_grad():
        err, p_stop = torch.zeros(B, D, device=logits.device), torch.zeros(B, D, device=logits.device)
        seen = torch.zeros(B, D, dtype=torch.bool, device=logits.device)
        for node, idx, exit_logits, P in record.exits:  # (B_n,), (B_n, classes), (B_n, K) with the stop child last
            err[idx, node.depth] = (exit_logits.argmax(-1) != y[idx]).float()
            p_stop[idx, node.depth], seen[idx, node.depth] = P[:, -1].float(), True
        V = (logits.argmax(-1) != y).float() + cost[record.leaf_depth]  # (B,) the leaf that ran
        gain = torch.zeros(B, D, device=logits.device)
        for d in reversed(range(D)):  # backwards along every path at once: one step per depth
            here = err[:, d] + cost[d]
            gain[:, d] = torch.where(seen[:, d], V - here, 0.0)
            V = torch.where(seen[:, d], p_stop[:, d] * here + (1 - p_stop[:, d]) * V, V)
    terms = []
    for node, idx, _, P in record.exits:
        g, p = gain[idx, node.depth], P[:, -1].clamp(1e-6, 1 - 1e-6)  # (B_n,)
        terms.append(-(g.clamp(min=0) * p.log() + (-g).clamp(min=0) * torch.log1p(-p)).sum())
    return torch.stack(terms).sum() / B if terms else torch.zeros((), device=logits.device)


def balance_loss(record) -> torch.Tensor:
    """§2.2's load-balancing loss M sum_m (f_m - 1/M)^2 over the M sibling stage children of each node that has
    several (f_m: mean of P renormalised over them), averaged over those nodes. The stop child is left out:
    how many samples stop is route_loss's business, and balancing it would fight the price of compute."""
    terms = []
    for node, P in record.decisions:
        M = len(node.stage_children)
        if M > 1:
            f = (P[:, :M] / P[:, :M].sum(1, keepdim=True)).mean(0)  # (M,) the siblings' shares
            terms.append(M * (f - 1.0 / M).pow(2).sum())
    return torch.stack(terms).mean() if terms else torch.zeros((), device=record.leaf_depth.device)


def split_loss(record) -> torch.Tensor:
    """Ours (grow_prune.split): each grown specialist's parent learns which samples are the specialist's. The
    binary cross-entropy of the specialist's share of the stage children's P (stop left out) against the side
    of the split it was grown for, averaged over specialists; 0 where none was grown."""
    terms = []
    for _, P, sides in record.splits:
        M = len(sides)
        share = P[:, :M] / P[:, :M].sum(1, keepdim=True)  # (B_n, M) renormalised over the stage children
        terms += [F.binary_cross_entropy(share[:, k].clamp(1e-6, 1 - 1e-6), side)
                  for k, side in enumerate(sides) if side is not None]
    return torch.stack(terms).mean() if terms else torch.zeros((), device=record.leaf_depth.device)


def juliet_loss(net, record, logits: torch.Tensor, y: torch.Tensor, exit_weight: float = 1.0, route_weight: float = 1.0,
                cost_weight: float = 0.05, expected_cost_weight: float = 0.0, balance_weight: float = 0.0,
                split_weight: float = 0.0) -> torch.Tensor:
    """The training objective of a Juliet step: the task loss plus each routing loss that has a weight
    (defaults: the training script's recipe; `exit_weight=route_weight=0` is the paper's task loss alone)."""
    loss = F.cross_entropy(logits, y)
    if exit_weight:  # deep supervision of the early exits
        loss = loss + exit_weight * exit_loss(record, y)
    if route_weight:  # stop decisions on the expected loss of their policy, at a price of compute
        loss = loss + route_weight * route_loss(net, record, logits, y, cost_weight=cost_weight)
    if expected_cost_weight:  # compute-aware straight-through routing
        loss = loss + expected_cost_weight * expected_cost_loss(net, record)
    if balance_weight:  # §2.2 load balancing of sibling stage children
        loss = loss + balance_weight * balance_loss(record)
    if split_weight:  # grown specialists get the side of the split they were grown for
        loss = loss + split_weight * split_loss(record)
    return loss
