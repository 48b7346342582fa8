"""The exits: every exit of every sample, the policies that choose among them, and their baselines (paper
§2.1, §5.2 "Metrics"); what routing does with data.

One pass over a test set with nobody stopping (`exit_table`) records, for every sample and every depth of
its path, the exit's prediction and confidence and the selector's P_stop. Every policy on that trie is then
a choice of one exit per sample, scored without running the net again:

  juliet(t)        stop at the first node where P_stop >= t: the compute knob of one checkpoint (t = 1:
                   nobody stops); `top1` is the paper's argmax routing.
  fixed depth d    every sample exits at depth d; the upper hull of these points is what random mixing
                   of depths reaches. Learned routing is worth having only above it.
  confidence(c)    exit where the exit's max softmax >= c (Shallow-Deep Networks, MSDNet): the standard
                   early exit on the same trained exits.

Costs are executed MACs per sample (THOP, measure.py): Juliet pays the stages and selectors of its path and
one exit; a fixed-depth exit pays stages and its exit; the confidence exit pays stages and every exit it
tries. Selectors count for the baselines only where a node has sibling stages to choose between.

Held-out stop decisions (ours; README "Paper notes and deviations"). The selectors learn where to stop from
training samples, by a loss that is not the decision the knob is judged on; on real digits the trained
stop fell below a plain confidence threshold. After training, `calibrate_net` refits every
stop decision on the validation split (a logistic regression per node on the selector's stop log-odds and the
exit's confidence, EENet-style) and picks the operating point there: the cheapest threshold within a declared
tolerance of full-depth accuracy (`operating_point`). The knob's thresholds are then estimated probabilities
that stopping loses nothing, comparable across nodes.

    table = exit_table(net, loader, device)
    curve = juliet_curve(table)                    # [{"t", "macs", "top1"}, ...], monotone in t, every t that moves
    fixed = fixed_depth_points(table); hull_top1(fixed, macs)
    rep = curve_report(table, static)              # curve.json; plots.plot_curve draws it
    calibrate_net(net, val_loader, device, tolerance=0.5)  # the held-out stop policy and operating point
"""

import collections

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import measure
from routers import IDENTITY, STOP, STOP_RULES, calibration_features, stops

# ----------------------------------------------------------------------------- one pass, every exit


@torch.no_grad()
def exit_table(net, loader, device, input_size=32, max_batches=None, quiet=False) -> dict:
    """Per sample n and depth d of its path (NaN / -1 / False past its leaf): p_stop and p_stage (the best stage
    child's P; NaN at the leaf, which decides nothing), correct and conf (max softmax) of the exit at d, the node
    index (into `nodes`) it sits at, and `leaf`, True at the depth of the stage leaf that ends the path; plus
    labels, the dataset's `group` of each sample where it has one, and the MACs tables of `costs`."""
    D, rows = len(net.backbone.stages), collections.defaultdict(list)
    nodes = [n.node_id for n in net.nodes() if not n.is_stop]
    index = {nid: i for i, nid in enumerate(nodes)}
    with measure.evaluating(net):
        for b, (x, y) in enumerate(tqdm(loader, desc="exits", leave=False, disable=quiet)):
            if max_batches is not None and b >= max_batches:
                break
            x, y, B = x.to(device), y.to(device), len(y)
            logits, paths, record = net(x, return_paths=True, stop_threshold=1.0, return_record=True)  # all exits
            t = {k: torch.full((B, D), v, dtype=dt) for k, v, dt in
                 (("p_stop", float("nan"), torch.float), ("p_stage", float("nan"), torch.float),
                  ("conf", float("nan"), torch.float), ("correct", False, torch.bool), ("node", -1, torch.long),
                  ("leaf", False, torch.bool))}
            t["features"] = torch.full((B, D, 5), float("nan"))  # the exit's calibration_features
            last = torch.full((B, logits.shape[1]), float("nan"), device=x.device)  # the path's last exit (pre-order)
            for node, idx, exit_logits, P in record.exits:  # (B_n,), (B_n, classes), (B_n, K) with the stop child last
                conf, pred = exit_logits.float().softmax(-1).max(-1)  # the exit's prediction
                i, d = idx.cpu(), node.depth
                t["p_stop"][i, d], t["p_stage"][i, d] = P[:, -1].cpu(), P[:, :-1].max(-1).values.cpu()
                t["conf"][i, d], t["correct"][i, d] = conf.cpu(), (pred == y[idx]).cpu()
                t["features"][i, d] = calibration_features(exit_logits, last[idx]).cpu()
                last[idx] = exit_logits.float()
                t["node"][i, d] = index[node.node_id]
            # the stage leaf every sample reached: its exit is the net's logits
            n, d = torch.arange(B), torch.tensor([net.node(p).depth for p in paths])  # (B,), (B,)
            conf, pred = logits.float().softmax(-1).max(-1)
            t["node"][n, d], t["leaf"][n, d] = torch.tensor([index[p] for p in paths]), True
            t["conf"][n, d], t["correct"][n, d] = conf.cpu(), (pred == y).cpu()
            for k, v in t.items():
                rows[k].append(v)
            rows["label"].append(y.cpu())
    table = {k: torch.cat(v) for k, v in rows.items()}
    base = getattr(loader.dataset, "base", loader.dataset)
    groups = getattr(base, "group", None)
    if groups is not None and not max_batches:
        table["group"] = [groups[i] for i in getattr(loader.dataset, "indices", range(len(groups)))]
    table.update(nodes=nodes, stop_rule=net.options.get("stop_rule", "argmax"),
                 stop_threshold=net.options.get("stop_threshold"), **costs(net, nodes, input_size))
    return table


@torch.no_grad()
def full_depth_top1(net, loader, device) -> float:
    """Top-1 (%) with nobody stopping: the trie's deepest exits (what the kept checkpoint is chosen on)."""
    hits = [net(x.to(device), stop_threshold=1.0).argmax(1).cpu() == y for x, y in loader]  # (B,) each
    return 100 * float(torch.cat(hits).float().mean())


def costs(net, nodes, input_size=32) -> dict:
    """MACs of exiting at each node, per policy: `cost_juliet` (path_macs of the node's stop leaf, or of the
    leaf itself), `cost_fixed` (stages + this exit), `cost_conf` (stages + every exit on the way)."""
    parts, table = measure.node_macs(net, input_size), measure.path_macs_table(net, input_size)
    out = {k: torch.zeros(len(nodes), dtype=torch.float64) for k in ("cost_juliet", "cost_fixed", "cost_conf")}
    for i, nid in enumerate(nodes):
        path = net.path(nid)
        sib = sum(parts[n.node_id]["selector"] for n in path[:-1] if len(n.stage_children) > 1)
        stages = sum(parts[n.node_id]["stage"] for n in path)
        out["cost_juliet"][i] = table[f"{nid}/{STOP}" if f"{nid}/{STOP}" in table else nid]
        out["cost_fixed"][i] = stages + sib + parts[nid]["exit"]
        out["cost_conf"][i] = stages + sib + sum(parts[n.node_id]["exit"] for n in path)
    return out


# ----------------------------------------------------------------------------- policies


def score(table: dict, exit_depth: torch.Tensor, cost: str = "cost_juliet") -> dict:
    """Top-1 (%) and mean MACs when sample n exits at depth exit_depth[n]."""
    n = torch.arange(len(exit_depth))
    hit = table["correct"][n, exit_depth].float()  # (N,)
    return {"macs": float(table[cost][table["node"][n, exit_depth]].mean()), "top1": 100 * float(hit.mean())}


def first(mask: torch.Tensor, table: dict) -> torch.Tensor:
    """Depth of each sample's first True in `mask` (N, D), its leaf if none: where it exits."""
    return (mask | table["leaf"]).float().argmax(1)


RULES = {"half": "stop rule 'half', P_stop >= 1/2", "argmax": "stop rule 'argmax', the paper's"}


def juliet_exits(table: dict, t: float | None) -> torch.Tensor:
    """Exit depths under the stop threshold t (None: the net's operating point -- its held-out threshold, else its
    stop rule: "half", t = 1/2, or the paper's "argmax", stop where P_stop beats every stage child)."""
    if t is None:
        t = table.get("stop_threshold")
        t = STOP_RULES[table.get("stop_rule", "argmax")] if t is None else t
    return first(stops(table["p_stop"].nan_to_num(-1.0), table["p_stage"].nan_to_num(2.0), t), table)


def knob(values: torch.Tensor, most: int = 2000) -> list[float]:
    """Every setting of a threshold that changes some sample's exit: 0, each distinct value in `values`, 1 (at most
    `most` of them, evenly spaced quantiles). Exits move only where the threshold crosses a value."""
    v = values[torch.isfinite(values)].double().unique()
    if len(v) > most:
        v = v[torch.linspace(0, len(v) - 1, most).round().long()]
    return sorted({0.0, 1.0, *v.clamp(0, 1).tolist()})


def thin(points: list[dict], spacing: float = 0.005) -> list[dict]:
    """Points in the knob's order (MACs monotone), dropping each whose MACs lie within `spacing` x the MAC span of
    the last one kept (the ends stay): no band of the span left without a point, and no thousand-row JSON."""
    if len(points) < 3:
        return points
    span = max(p["macs"] for p in points) - min(p["macs"] for p in points)
    kept = [points[0]]
    for p in points[1:-1]:
        if abs(p["macs"] - kept[-1]["macs"]) > spacing * span:
            kept.append(p)
    return kept + [points[-1]]


def juliet_curve(table: dict, thresholds=None) -> list[dict]:
    """The knob of one checkpoint: (t, MACs, top-1) at each stop threshold t (default: every t that moves an exit)."""
    ts = knob(table["p_stop"]) if thresholds is None else thresholds
    return thin([{"t": t, **score(table, juliet_exits(table, t))} for t in ts])


def confidence_curve(table: dict, thresholds=None) -> list[dict]:
    """The standard confidence early exit on the same exits: the first exit whose max softmax >= c."""
    cs = knob(table["conf"]) if thresholds is None else thresholds
    return thin([{"c": c, **score(table, first(table["conf"].nan_to_num(-1.0) >= c, table), "cost_conf")}
                 for c in cs])


def fixed_depth_points(table: dict) -> list[dict]:
    """Every exit on every sample (a path that ends sooner exits at its leaf): accuracy and MACs per depth."""
    last = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    return [{"depth": d, **score(table, last.clamp(max=d), "cost_fixed")}
            for d in range(table["node"].shape[1]) if (table["node"][:, d] >= 0).any()]


def upper_hull(points: list[dict]) -> list[dict]:
    """The upper concave envelope of (macs, top1) points: what mixing them at random reaches."""
    pts = sorted(points, key=lambda p: (p["macs"], -p["top1"]))
    hull = []
    for p in pts:
        while len(hull) >= 2:  # drop the last point while it lies on or below the chord to p
            (a, b) = hull[-2], hull[-1]
            if (b["macs"] - a["macs"]) * (p["top1"] - a["top1"]) < (b["top1"] - a["top1"]) * (p["macs"] - a["macs"]):
                break
            hull.pop()
        if not hull or p["top1"] > hull[-1]["top1"]:
            hull.append(p)
    return hull


def interp(points: list[dict], macs: float) -> float | None:
    """Top-1 of the piecewise-linear curve through `points` (by MACs) at `macs`; None outside its span."""
    pts = sorted(points, key=lambda p: p["macs"])
    xs, ys = [p["macs"] for p in pts], [p["top1"] for p in pts]
    if not xs or macs < xs[0] - 1e-6 or macs > xs[-1] + 1e-6:
        return None
    return float(np.interp(macs, xs, ys))


def hull_top1(points: list[dict], macs: float) -> float | None:
    """Top-1 that mixing the points at random reaches at `macs`: their upper hull, flat beyond its best point
    (more compute can always be wasted); None below the cheapest point."""
    hull = upper_hull(points)
    return hull[-1]["top1"] if hull and macs > hull[-1]["macs"] else interp(hull, macs)


def threshold_for_budget(table: dict, budget: float, steps: int = 201) -> float:
    """The largest stop threshold t whose mean executed MACs on `table` (a validation split) stay within `budget`:
    MSDNet's budgeted classification on one checkpoint. MACs grow with t, so larger t is the better trade."""
    ok = [t for t in np.linspace(0, 1, steps) if score(table, juliet_exits(table, float(t)))["macs"] <= budget]
    if not ok:
        raise ValueError(f"a budget of {budget / 1e6:.2f} M MACs is below the cheapest exit "
                         f"({score(table, juliet_exits(table, 0.0))['macs'] / 1e6:.2f} M)")
    return round(float(ok[-1]), 4)


def curve_report(table: dict, static: dict, thresholds=None) -> dict:
    """curve.json: the compute knob of one checkpoint against (a) the fixed-depth exits and their hull, (b) the
    confidence early exit on the same exits and (c) the static backbone, each read at the knob's MACs; and the
    summaries: the knob minus the confidence exit over 25-100% of the static MACs, the operating point minus
    the hull, and any 10% band of the knob's MAC span without a point."""
    curve, conf, fixed = juliet_curve(table, thresholds), confidence_curve(table, thresholds), fixed_depth_points(table)
    matched = [{"t": p["t"], "macs": p["macs"], "juliet_top1": p["top1"],
                "fixed_hull_top1": hull_top1(fixed, p["macs"]),
                "confidence_top1": hull_top1(conf, p["macs"]), "static_top1": static.get("top1")}
               for p in curve]
    macs = [p["macs"] for p in curve]
    lo, hi = min(macs), max(macs)
    # each knob read as its upper hull, what it reaches with at most these MACs (the baselines' reading too)
    gaps = [hull_top1(curve, m) - hull_top1(conf, m) for m in macs
            if hull_top1(conf, m) is not None and 0.25 * static["macs"] <= m <= static["macs"]]
    point = score(table, juliet_exits(table, None))
    hull = hull_top1(fixed, point["macs"])
    empty = [k for k in range(10) if hi > lo and not any(lo + k * (hi - lo) / 10 <= m <= lo + (k + 1) * (hi - lo) / 10
                                                        for m in macs)]
    return {"juliet_curve": curve, "juliet_top1_policy": point, "stop_rule": table.get("stop_rule", "argmax"),
            "stop_threshold": table.get("stop_threshold"), "above_hull_at_operating_point":
                None if hull is None else point["top1"] - hull,
            "vs_confidence_25_100": {"min": min(gaps, default=None), "mean": float(np.mean(gaps)) if gaps else None,
                                     "points": len(gaps)},
            "empty_bands": empty, "confidence_curve": conf, "fixed_depth": fixed, "fixed_hull": upper_hull(fixed),
            "static": static, "matched": matched, "macs_span": hi / lo, "samples": len(table["label"])}


def format_curve(rep: dict) -> str:
    """The matched-MACs table of curve_report, the point nearest each tenth of the knob's MAC span, and summaries."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    out = ["| t | executed MACs (M) | Juliet top-1 | fixed-depth hull | confidence exit | static |",
           "|---|---|---|---|---|---|"]
    rows = rep["matched"]  # in knob order, MACs non-decreasing
    lo, hi = rows[0]["macs"], rows[-1]["macs"]
    nearest = {min(range(len(rows)), key=lambda i: abs(rows[i]["macs"] - lo - k * (hi - lo) / 10)) for k in range(11)}
    for r in (rows[i] for i in sorted(nearest)):
        out.append(f"| {r['t']:.3f} | {r['macs'] / 1e6:.2f} | {f(r['juliet_top1'])} | {f(r['fixed_hull_top1'])} | "
                   f"{f(r['confidence_top1'])} | {f(r['static_top1'])} |")
    top, vs = rep["juliet_top1_policy"], rep["vs_confidence_25_100"]
    rule = RULES[rep.get("stop_rule", "argmax")] if rep.get("stop_threshold") is None else \
        f"held-out operating point t = {rep['stop_threshold']:.3f}"
    out.append(f"\noperating point ({rule}): {top['top1']:.2f}% at {top['macs'] / 1e6:.2f} M MACs, "
               f"{f(rep['above_hull_at_operating_point'])} above the fixed-depth hull; "
               f"static: {f(rep['static'].get('top1'))}% at {rep['static']['macs'] / 1e6:.2f} M")
    out.append(f"Juliet minus the confidence exit at matched MACs (upper hulls), 25-100% of static: "
               f"min {f(vs['min'])}, "
               f"mean {f(vs['mean'])} over {vs['points']} points; {len(rep['juliet_curve'])} points span "
               f"{rep['macs_span']:.1f}x in executed MACs, empty 10% bands: {rep['empty_bands'] or 'none'}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- held-out stop decisions (ours)


def stop_targets(table: dict) -> torch.Tensor:
    """(N, D): 1 where exiting at depth d loses nothing against the sample's own leaf (the exit is right, or the
    leaf is wrong too), the event a stop decision bets on."""
    leaf = table["correct"][torch.arange(len(table["label"])), table["leaf"].float().argmax(1)]  # (N,)
    return (table["correct"] | ~leaf[:, None]).float()


def calibrate(table: dict, l2: float = 1e-3, steps: int = 200) -> dict[str, torch.Tensor]:
    """Fit each stop decision on held-out samples (EENet-style; ours): per node, a logistic regression of
    `stop_targets` on [d, calibration_features], d the selector's stop log-odds, on an exit table of the
    validation split taken with the calibration at identity: data neither the exits nor the selectors were
    trained on. Where a node's targets are all one class (every validation sample there was safe to stop) no
    maximum-likelihood fit exists: its intercept runs off and gives every sample one saturated P_stop, a jump
    in the knob. There the fit is MAP under a prior centred on the identity, so P_stop keeps the trained
    selector's ranking. Returns {node id: [a, w_1, ..., w_5, b]} for routers.Selector.set_calibration."""
    out, y = {}, stop_targets(table)
    routed = ~table["leaf"] & torch.isfinite(table["p_stop"])  # (N, D): a decision was taken there
    for i, nid in enumerate(table["nodes"]):
        at = routed & (table["node"] == i)  # (N, D), one depth per node
        if not at.any():
            continue
        p = table["p_stop"][at].double().clamp(1e-6, 1 - 1e-6)  # (M,)
        x = torch.cat([(p.log() - (-p).log1p())[:, None], table["features"][at].double()], 1)  # (M, 6)
        one_class = bool((y[at] == y[at][0]).all())
        out[nid] = fit_logistic(x, y[at].double(), l2, steps, IDENTITY.double() if one_class else None).float()
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int, prior=None) -> torch.Tensor:
    """argmin over (w, b) of mean BCE(sigmoid(x w + b), y) + l2 |w|^2, on standardised features (a near-constant
    feature is scaled as if its spread were 0.1), by L-BFGS; returns [w..., b] for the raw features. With a
    `prior` [w..., b] (raw), the penalty is l2 |theta - prior|^2 over weights and intercept alike (MAP)."""
    mean, std = x.mean(0), x.std(0).nan_to_num(0.0).clamp(min=0.1)  # (F,); a floor: no huge raw weights
    z = (x - mean) / std  # (M, F)
    centre = torch.zeros(x.shape[1] + 1, dtype=x.dtype)  # theta's prior mean, in the standardised coordinates
    if prior is not None:
        centre = torch.cat([prior[:-1] * std, prior[-1:] + (mean * prior[:-1]).sum()[None]])
    theta = centre.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")
    pull = slice(None) if prior is not None else slice(0, -1)  # without a prior the intercept is free

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
    """The cheapest stop threshold within `tolerance` points of nobody stopping (t = 1) on `table`, the validation
    split, both as counted there and as expected from the calibrated P_stop (each sample stopped before its leaf
    loses 1 - P_stop): a small split counts in coarse steps, so its count alone would stop too eagerly. The
    default operating point, chosen on held-out data: {"t", "macs", "top1", "expected_drop"}."""
    full, n = score(table, juliet_exits(table, 1.0))["top1"], torch.arange(len(table["label"]))
    leaf = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    points = []
    for t in knob(table["p_stop"]):
        depth = juliet_exits(table, t)  # (N,)
        drop = 100 * float(((depth < leaf).float() * (1 - table["p_stop"][n, depth].nan_to_num(1.0))).mean())
        points.append({"t": t, **score(table, depth), "expected_drop": drop})
    ok = [p for p in points if p["top1"] >= full - tolerance - 1e-9 and p["expected_drop"] <= tolerance + 1e-9]
    return min(ok, key=lambda p: (p["macs"], -p["top1"]))


def calibrate_net(net, val_loader, device, tolerance: float, input_size=32, quiet=False) -> dict:
    """The held-out stop policy of a trained trie, on the validation split: fit every stop decision (`calibrate`),
    then set the operating point (`operating_point`) as `net.options["stop_threshold"]`. Returns what was chosen."""
    for node in net.nodes():
        if node.selector is not None:
            node.selector.set_calibration(IDENTITY)
    net.options["stop_threshold"] = None
    fits = calibrate(exit_table(net, val_loader, device, input_size, quiet=quiet))
    for nid, coefficients in fits.items():
        net.node(nid).selector.set_calibration(coefficients)
    point = operating_point(exit_table(net, val_loader, device, input_size, quiet=quiet), tolerance)
    net.options["stop_threshold"] = point["t"]
    return {"calibration": {k: [round(float(c), 4) for c in v] for k, v in fits.items()},
            "val_operating_point": point, "stop_tolerance": tolerance}


# ----------------------------------------------------------------------------- reports


def leaf_ids(table: dict, exit_depth: torch.Tensor | None = None) -> list[str]:
    """The leaf each sample ends at when it exits at exit_depth (default: the table's operating point): a node's
    stop child, or the stage leaf."""
    exit_depth = juliet_exits(table, None) if exit_depth is None else exit_depth
    n = torch.arange(len(exit_depth))
    node, leaf = table["node"][n, exit_depth].tolist(), table["leaf"][n, exit_depth].tolist()
    return [table["nodes"][i] + ("" if is_leaf else f"/{STOP}") for i, is_leaf in zip(node, leaf)]


def report(table: dict) -> dict:
    """final.json's routing fields: every exit on all samples, where top-1 routing sits against their hull,
    and per group of samples (e.g. easy / hard on the synthetic set) the mean depth, top-1 and leaves."""
    fixed = fixed_depth_points(table)
    last = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    depth = juliet_exits(table, None)
    top1 = score(table, depth)
    hull = hull_top1(fixed, top1["macs"])
    exits = [p["top1"] for p in fixed]
    out = {"test_exits_all_samples": fixed,
           "test_exits_nondecreasing": all(b >= a - 1.0 for a, b in zip(exits, exits[1:])),
           "test_hull_top1_at_executed_macs": hull,
           "test_top1_above_hull": None if hull is None else top1["top1"] - hull}
    if "group" in table:
        leaves, groups = leaf_ids(table, depth), table["group"]
        out["test_groups"] = {}
        for g in sorted(set(groups)):
            mask = torch.tensor([x == g for x in groups])
            out["test_groups"][g] = {
                "samples": int(mask.sum()), "mean_depth": float(depth[mask].float().mean()),
                "top1": 100 * float(table["correct"][torch.arange(len(depth)), depth][mask].float().mean()),
                "exits_top1": [100 * float(table["correct"][torch.arange(len(depth)), last.clamp(max=p["depth"])][mask]
                                           .float().mean()) for p in fixed],
                "leaves": dict(collections.Counter(leaf for leaf, m in zip(leaves, mask.tolist()) if m))}
    return out


def collapse_message(leaf_counts: dict, n_leaves: int, share: float = 0.95) -> str | None:
    """One line when one leaf takes >= `share` of the samples while the trie has more than one leaf."""
    n = sum(leaf_counts.values())
    if n_leaves < 2 or not n:
        return None
    leaf, top = max(leaf_counts.items(), key=lambda kv: kv[1])
    if top / n < share:
        return None
    return (f"routing has collapsed: {100 * top / n:.1f}% of {n} samples end at {leaf} "
            f"while the trie has {n_leaves} leaves")
