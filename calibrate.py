"""Held-out stop decisions (ours; README "Paper notes and deviations", `--calibrate`).

The selectors learn where to stop from training samples, by a loss (losses.route_loss) that is
not the decision the compute knob is judged on; on real digits the trained stop fell below a plain
confidence threshold on the same exits. After training, `calibrate_net` refits every stop decision
on the validation set and picks the default operating point there:

  calibrate        per node, a logistic regression (EENet-style) of "stopping here loses nothing
                   against the sample's own leaf" on the selector's stop log-odds and the exit's
                   confidence features (routers.calibration_features): 7 numbers a node, which
                   routers.Selector applies as `calibration`; the selector itself is unchanged
  operating_point  the cheapest threshold within `stop_tolerance` points of full depth, counted and
                   expected, set with JulietNet.set_operating_point

The knob's thresholds are then estimated probabilities that stopping loses nothing, comparable
across nodes. Everything is fitted on an exit table (exits.py) of held-out data.

    calibrate_net(net, val_loader, device, stop_tolerance=0.5)  # {"calibration", ...}
"""

import collections

import torch
import torch.nn.functional as F
from tqdm import tqdm

from exits import collapse_message, exit_table, juliet_exits, knob, leaf_ids, score
from routers import IDENTITY


def stop_targets(table: dict) -> torch.Tensor:
    """(N, D): 1 where exiting at depth d loses nothing against the sample's own leaf (the exit is
    right, or the leaf is wrong too): the event a stop decision bets on."""
    leaf_depth = table["leaf"].float().argmax(1)  # (N,)
    leaf = table["correct"][torch.arange(len(table["label"])), leaf_depth]  # (N,)
    return (table["correct"] | ~leaf[:, None]).float()


def calibrate(table: dict, l2: float = 1e-3, steps: int = 200) -> dict[str, torch.Tensor]:
    """Fit each stop decision on held-out samples (EENet-style; ours): per node, a logistic
    regression of `stop_targets` on [d, calibration_features], d the selector's stop log-odds, on
    an exit table of the validation set taken with the calibration at identity. Where a node's
    targets are all one class no maximum-likelihood fit exists (the intercept runs off and saturates
    every P_stop: a jump in the knob); there the fit is MAP under a prior centred on the identity,
    so P_stop keeps the trained selector's ranking. {node id: [a, w_1..w_5, b]}."""
    out, y = {}, stop_targets(table)
    routed = ~table["leaf"] & torch.isfinite(table["p_stop"])  # (N, D): a decision was taken
    for i, nid in enumerate(table["nodes"]):
        at = routed & (table["node"] == i)  # (N, D), one depth per node
        if not at.any():
            continue
        p = table["p_stop"][at].double().clamp(1e-6, 1 - 1e-6)  # (M,)
        x = torch.cat([(p.log() - (-p).log1p())[:, None], table["features"][at].double()], 1)
        prior = IDENTITY.double() if bool((y[at] == y[at][0]).all()) else None  # one class
        out[nid] = fit_logistic(x, y[at].double(), l2, steps, prior).float()
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int, prior=None):
    """argmin over (w, b) of mean BCE(sigmoid(x w + b), y) + l2 |w|^2 on standardised features (a
    near-constant one scaled as if its spread were 0.1), by L-BFGS: [w..., b] for the raw features.
    With a `prior` [w..., b] (raw), the penalty is l2 |theta - prior|^2, intercept too (MAP)."""
    mean, std = x.mean(0), x.std(0).nan_to_num(0.0).clamp(min=0.1)  # (F,); no huge raw weights
    z = (x - mean) / std  # (M, F)
    centre = torch.zeros(x.shape[1] + 1, dtype=x.dtype)  # the prior, in standardised coordinates
    if prior is not None:
        centre = torch.cat([prior[:-1] * std, prior[-1:] + (mean * prior[:-1]).sum()[None]])
    theta = centre.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")
    pull = slice(None) if prior is not None else slice(0, -1)  # without a prior: a free intercept

    def loss():
        opt.zero_grad()
        value = (F.binary_cross_entropy_with_logits(z @ theta[:-1] + theta[-1], y)
                 + l2 * (theta - centre)[pull].pow(2).sum())
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    w = theta.detach()[:-1] / std
    return torch.cat([w, theta.detach()[-1:] - (mean * w).sum()[None]])


def operating_point(table: dict, tolerance: float) -> dict:
    """The cheapest stop threshold within `tolerance` points of nobody stopping (t = 1) on `table`
    (the validation set), both as counted and as expected from the calibrated P_stop (a sample
    stopped before its leaf loses 1 - P_stop): a small set counts in coarse steps, and its count
    alone would stop too eagerly. {"t", "macs", "top1", "expected_drop"}."""
    full, n = score(table, juliet_exits(table, 1.0))["top1"], torch.arange(len(table["label"]))
    leaf = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    points = []
    for t in knob(table["p_stop"]):
        depth = juliet_exits(table, t)  # (N,)
        lost = (depth < leaf).float() * (1 - table["p_stop"][n, depth].nan_to_num(1.0))  # (N,)
        points.append({"t": t, **score(table, depth), "expected_drop": 100 * float(lost.mean())})
    ok = [p for p in points
          if p["top1"] >= full - tolerance - 1e-9 and p["expected_drop"] <= tolerance + 1e-9]
    return min(ok, key=lambda p: (p["macs"], -p["top1"]))


def calibrate_net(net, val_loader, device, stop_tolerance: float, input_size=32, quiet=False):
    """A trained trie's held-out stop policy, on the validation set: fit every stop decision
    (`calibrate`), then set the operating point (`operating_point`); warn if validation's routing
    there has collapsed onto one leaf. Returns what was chosen."""
    for node in net.nodes():
        if node.selector is not None:
            node.selector.set_calibration(IDENTITY)
    net.set_operating_point(None)
    fits = calibrate(exit_table(net, val_loader, device, input_size, quiet=quiet))
    for nid, coefficients in fits.items():
        net.node(nid).selector.set_calibration(coefficients)
    table = exit_table(net, val_loader, device, input_size, quiet=quiet)
    point = operating_point(table, stop_tolerance)
    net.set_operating_point(point["t"])
    leaves = collections.Counter(leaf_ids(table, juliet_exits(table, point["t"])))
    collapsed = collapse_message(leaves, len(net.leaves()))  # training's untuned rule: not warned
    if collapsed:
        tqdm.write(f"warning: at the operating point calibrated on validation, {collapsed}")
    return {"calibration": {k: [round(float(c), 4) for c in v] for k, v in fits.items()},
            "val_operating_point": point, "stop_tolerance": stop_tolerance,
            "routing_collapsed": collapsed is not None}
