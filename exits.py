"""The exits: every exit of every sample, the policies that choose among them and their baselines
(paper §2.1, §5.2 "Metrics"): what routing does with data.

One pass over a test set with nobody stopping (`exit_table`) records, for every sample and every
depth of its path, the exit's prediction and confidence and the selector's P_stop. Every policy on
that trie is then a choice of one exit per sample, scored without running the net again:

  juliet(t)       stop at the first node where P_stop >= t (the stop rule, routers.stops): the
                  compute knob of one checkpoint (t = 1: nobody stops; None: its operating point)
  fixed depth d   every sample exits at depth d; the upper hull of these points is what mixing
                  depths at random reaches. Learned routing is worth having only above it.
  confidence(c)   exit where the exit's max softmax >= c (Shallow-Deep Networks, MSDNet): the
                  standard early exit on the same trained exits

Costs are executed MACs per sample (THOP, measure.py): Juliet pays the stages and selectors of its
path and one exit; a fixed-depth exit pays stages and its exit; the confidence exit pays stages and
every exit it tries. Selectors count for the baselines only where a node has sibling stages.

The held-out stop decisions that refit P_stop on these tables are calibrate.py's.

    table = exit_table(net, loader, device)
    curve = juliet_curve(table)         # [{"t", "macs", "top1"}, ...]: every t that moves an exit
    rep = curve_report(table, static)   # curve.json, against the baselines; plots.plot_curve
"""

import collections

import numpy as np
import torch
from tqdm import tqdm

import measure
from losses import exits_of
from routers import STOP, STOP_RULES, calibration_features, stops

# ----------------------------------------------------------------------------- one pass, every exit

COLUMNS = (("p_stop", float("nan"), torch.float), ("p_stage", float("nan"), torch.float),
           ("conf", float("nan"), torch.float), ("correct", False, torch.bool),
           ("node", -1, torch.long), ("leaf", False, torch.bool))


@torch.no_grad()
def exit_table(net, loader, device, input_size=32, max_batches=None, quiet=False) -> dict:
    """Per sample n and depth d of its path (NaN / -1 / False past its leaf): p_stop and p_stage
    (the best stage branch's P; NaN at the leaf, which decides nothing), correct and conf (max
    softmax) of the exit at d, the index (into `nodes`) of its node, and `leaf`, True at the depth
    of the stage leaf that ends the path; plus labels, each sample's `group` where the dataset has
    one, and the MACs of `costs`."""
    rows = collections.defaultdict(list)
    nodes = [n.node_id for n in net.nodes() if not n.is_stop]
    with measure.evaluating(net):
        for b, (x, y) in enumerate(tqdm(loader, desc="exits", leave=False, disable=quiet)):
            if max_batches is not None and b >= max_batches:
                break
            for k, v in table_rows(net, x.to(device), y.to(device), nodes).items():
                rows[k].append(v)
            rows["label"].append(y.cpu())
    table = {k: torch.cat(v) for k, v in rows.items()}
    base = getattr(loader.dataset, "base", loader.dataset)
    groups = getattr(base, "group", None)
    if groups is not None and not max_batches:
        indices = getattr(loader.dataset, "indices", range(len(groups)))
        table["group"] = [groups[i] for i in indices]
    table.update(nodes=nodes, stop_rule=net.options.get("stop_rule", "argmax"),
                 stop_threshold=net.options.get("stop_threshold"), **costs(net, nodes, input_size))
    return table


def table_rows(net, x, y, nodes: list[str]) -> dict:
    """One batch's rows of `exit_table`: a forward pass with nobody stopping records every exit."""
    B, D, index = len(y), len(net.backbone.stages), {nid: i for i, nid in enumerate(nodes)}
    logits, paths, record = net(x, return_paths=True, stop_threshold=1.0, return_record=True)
    t = {k: torch.full((B, D), v, dtype=dt) for k, v, dt in COLUMNS}
    t["features"] = torch.full((B, D, 5), float("nan"))  # the exit's calibration_features
    last = torch.full((B, logits.shape[1]), float("nan"), device=x.device)  # the path's last exit
    for r in exits_of(record):  # pre-order; P's stop branch last
        conf, pred = r.exit.float().softmax(-1).max(-1)  # the exit's prediction
        i, d = r.idx.cpu(), r.node.depth
        t["p_stop"][i, d], t["p_stage"][i, d] = r.P[:, -1].cpu(), r.P[:, :-1].max(-1).values.cpu()
        t["conf"][i, d], t["correct"][i, d] = conf.cpu(), (pred == y[r.idx]).cpu()
        t["features"][i, d] = calibration_features(r.exit, last[r.idx]).cpu()
        last[r.idx] = r.exit.float()
        t["node"][i, d] = index[r.node.node_id]
    # the stage leaf every sample reached: its exit is the net's logits
    n, d = torch.arange(B), torch.tensor([net.node(p).depth for p in paths])  # (B,), (B,)
    conf, pred = logits.float().softmax(-1).max(-1)
    t["node"][n, d], t["leaf"][n, d] = torch.tensor([index[p] for p in paths]), True
    t["conf"][n, d], t["correct"][n, d] = conf.cpu(), (pred == y).cpu()
    return t


@torch.no_grad()
def full_depth_top1(net, loader, device) -> float:
    """Top-1 (%) with nobody stopping: the deepest exits (what the kept checkpoint is chosen on)."""
    hits = [net(x.to(device), stop_threshold=1.0).argmax(1).cpu() == y for x, y in loader]  # (B,)
    return 100 * float(torch.cat(hits).float().mean())


def costs(net, nodes, input_size=32) -> dict:
    """MACs of exiting at each node, per policy: `cost_juliet` (the path of the node's stop leaf,
    or of the leaf itself), `cost_fixed` (stages + this exit), `cost_conf` (stages + every exit on
    the way)."""
    parts = measure.node_macs(net, input_size)
    table = measure.path_macs_table(net, input_size, parts)
    out = {k: torch.zeros(len(nodes), dtype=torch.float64)
           for k in ("cost_juliet", "cost_fixed", "cost_conf")}
    for i, nid in enumerate(nodes):
        path = net.path(nid)
        sib = sum(parts[n.node_id]["selector"] for n in path[:-1] if len(n.stage_branches) > 1)
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
    macs = table[cost][table["node"][n, exit_depth]]  # (N,)
    return {"macs": float(macs.mean()), "top1": 100 * float(hit.mean())}


def first(mask: torch.Tensor, table: dict) -> torch.Tensor:
    """Depth of each sample's first True in `mask` (N, D), its leaf if none: where it exits."""
    return (mask | table["leaf"]).float().argmax(1)


RULES = {"half": "stop rule 'half', P_stop >= 1/2", "argmax": "stop rule 'argmax', the paper's"}


def juliet_exits(table: dict, t: float | None) -> torch.Tensor:
    """Exit depths under the stop rule at threshold t (None: the net's operating point: its
    held-out threshold, else its stop rule: "half", t = 1/2, or the paper's "argmax")."""
    if t is None:
        t = table.get("stop_threshold")
        t = STOP_RULES[table.get("stop_rule", "argmax")] if t is None else t
    p_stop, p_stage = table["p_stop"].nan_to_num(-1.0), table["p_stage"].nan_to_num(2.0)
    return first(stops(p_stop, p_stage, t), table)


def knob(values: torch.Tensor, most: int = 2000) -> list[float]:
    """Every setting of a threshold that changes some sample's exit: 0, each distinct value in
    `values`, 1 (at most `most` of them, evenly spaced quantiles)."""
    v = values[torch.isfinite(values)].double().unique()
    if len(v) > most:
        v = v[torch.linspace(0, len(v) - 1, most).round().long()]
    return sorted({0.0, 1.0, *v.clamp(0, 1).tolist()})


def thin(points: list[dict], spacing: float = 0.005) -> list[dict]:
    """Points in the knob's order (MACs monotone), less each whose MACs lie within `spacing` x the
    MAC span of the last one kept (the ends stay): no band left empty, no thousand-row JSON."""
    if len(points) < 3:
        return points
    span = max(p["macs"] for p in points) - min(p["macs"] for p in points)
    kept = [points[0]]
    for p in points[1:-1]:
        if abs(p["macs"] - kept[-1]["macs"]) > spacing * span:
            kept.append(p)
    return kept + [points[-1]]


def juliet_curve(table: dict, thresholds=None) -> list[dict]:
    """One checkpoint's knob: (t, MACs, top-1) per stop threshold (default: every t that moves)."""
    ts = knob(table["p_stop"]) if thresholds is None else thresholds
    return thin([{"t": t, **score(table, juliet_exits(table, t))} for t in ts])


def confidence_curve(table: dict, thresholds=None) -> list[dict]:
    """The standard confidence early exit on the same exits: the first with max softmax >= c."""
    cs = knob(table["conf"]) if thresholds is None else thresholds
    conf = table["conf"].nan_to_num(-1.0)
    return thin([{"c": c, **score(table, first(conf >= c, table), "cost_conf")} for c in cs])


def fixed_depth_points(table: dict) -> list[dict]:
    """Every exit on every sample (a shorter path exits at its leaf): top-1 and MACs per depth."""
    last = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    return [{"depth": d, **score(table, last.clamp(max=d), "cost_fixed")}
            for d in range(table["node"].shape[1]) if (table["node"][:, d] >= 0).any()]


def upper_hull(points: list[dict]) -> list[dict]:
    """The upper concave envelope of (macs, top1) points: what mixing them at random reaches."""
    hull = []
    for p in sorted(points, key=lambda p: (p["macs"], -p["top1"])):
        while len(hull) >= 2:  # drop the last point while it lies on or below the chord to p
            a, b = hull[-2], hull[-1]
            cross = ((b["macs"] - a["macs"]) * (p["top1"] - a["top1"])
                     - (b["top1"] - a["top1"]) * (p["macs"] - a["macs"]))
            if cross < 0:
                break
            hull.pop()
        if not hull or p["top1"] > hull[-1]["top1"]:
            hull.append(p)
    return hull


def hull_top1(points: list[dict], macs: float) -> float | None:
    """Top-1 that mixing the points at random reaches at `macs`: their upper hull (piecewise
    linear), flat beyond its best point (more compute can always be wasted); None below the
    cheapest point."""
    hull = upper_hull(points)  # in order of MACs
    if not hull or macs < hull[0]["macs"] - 1e-6:
        return None
    return float(np.interp(macs, [p["macs"] for p in hull], [p["top1"] for p in hull]))


def threshold_for_budget(table: dict, budget: float, steps: int = 201) -> float:
    """The largest stop threshold whose mean executed MACs on `table` (a validation set) stay within
    `budget`: MSDNet's budgeted classification on one checkpoint (MACs grow with t)."""
    ts = [float(t) for t in np.linspace(0, 1, steps)]
    ok = [t for t in ts if score(table, juliet_exits(table, t))["macs"] <= budget]
    if not ok:
        cheapest = score(table, juliet_exits(table, 0.0))["macs"]
        raise ValueError(f"a budget of {budget / 1e6:.2f} M MACs is below the cheapest exit "
                         f"({cheapest / 1e6:.2f} M)")
    return round(ok[-1], 4)


def curve_report(table: dict, static: dict, thresholds=None) -> dict:
    """curve.json: one checkpoint's knob against the fixed-depth exits and their hull, the
    confidence exit on the same exits and the static backbone, each read at the knob's MACs; and
    the summaries: the knob minus the confidence exit over 25-100% of the static MACs, the operating
    point minus the hull, and any 10% band of the knob's MAC span without a point."""
    curve, conf = juliet_curve(table, thresholds), confidence_curve(table, thresholds)
    fixed = fixed_depth_points(table)
    matched = [{"t": p["t"], "macs": p["macs"], "juliet_top1": p["top1"],
                "fixed_hull_top1": hull_top1(fixed, p["macs"]),
                "confidence_top1": hull_top1(conf, p["macs"]), "static_top1": static.get("top1")}
               for p in curve]
    macs = [p["macs"] for p in curve]
    lo, hi = min(macs), max(macs)
    # each curve read as its upper hull: what it reaches with at most these MACs
    gaps = [hull_top1(curve, m) - hull_top1(conf, m) for m in macs
            if hull_top1(conf, m) is not None and 0.25 * static["macs"] <= m <= static["macs"]]
    point = score(table, juliet_exits(table, None))
    hull = hull_top1(fixed, point["macs"])
    bands = [(lo + k * (hi - lo) / 10, lo + (k + 1) * (hi - lo) / 10) for k in range(10)]
    empty = [k for k, (a, b) in enumerate(bands) if hi > lo and not any(a <= m <= b for m in macs)]
    return {"juliet_curve": curve, "juliet_top1_policy": point,
            "stop_rule": table.get("stop_rule", "argmax"),
            "stop_threshold": table.get("stop_threshold"),
            "above_hull_at_operating_point": None if hull is None else point["top1"] - hull,
            "vs_confidence_25_100": {"min": min(gaps, default=None),
                                     "mean": float(np.mean(gaps)) if gaps else None,
                                     "points": len(gaps)},
            "empty_bands": empty, "confidence_curve": conf, "fixed_depth": fixed,
            "fixed_hull": upper_hull(fixed), "static": static, "matched": matched,
            "macs_span": hi / lo, "samples": len(table["label"])}


def format_curve(rep: dict) -> str:
    """curve_report's matched-MACs table at the point nearest each tenth of the knob's MAC span,
    and its summaries."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    out = ["| t | executed MACs (M) | Juliet top-1 | fixed-depth hull | confidence exit | static |",
           "|---|---|---|---|---|---|"]
    rows = rep["matched"]  # in knob order, MACs non-decreasing
    lo, hi = rows[0]["macs"], rows[-1]["macs"]
    nearest = {min(range(len(rows)), key=lambda i: abs(rows[i]["macs"] - lo - k * (hi - lo) / 10))
               for k in range(11)}
    for r in (rows[i] for i in sorted(nearest)):
        cells = (r["juliet_top1"], r["fixed_hull_top1"], r["confidence_top1"], r["static_top1"])
        out.append(f"| {r['t']:.3f} | {r['macs'] / 1e6:.2f} | " + " | ".join(map(f, cells)) + " |")
    top, vs, static = rep["juliet_top1_policy"], rep["vs_confidence_25_100"], rep["static"]
    rule = RULES[rep.get("stop_rule", "argmax")] if rep.get("stop_threshold") is None else \
        f"held-out operating point t = {rep['stop_threshold']:.3f}"
    out.append(f"\noperating point ({rule}): {top['top1']:.2f}% at {top['macs'] / 1e6:.2f} M MACs, "
               f"{f(rep['above_hull_at_operating_point'])} above the fixed-depth hull; "
               f"static: {f(static.get('top1'))}% at {static['macs'] / 1e6:.2f} M")
    out.append("Juliet minus the confidence exit at matched MACs (upper hulls), 25-100% of static: "
               f"min {f(vs['min'])}, mean {f(vs['mean'])} over {vs['points']} points; "
               f"{len(rep['juliet_curve'])} points span {rep['macs_span']:.1f}x in executed MACs, "
               f"empty 10% bands: {rep['empty_bands'] or 'none'}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- reports


def leaf_ids(table: dict, exit_depth: torch.Tensor | None = None) -> list[str]:
    """The leaf each sample ends at when it exits at exit_depth (default: the operating point): a
    node's stop branch, or the stage leaf."""
    exit_depth = juliet_exits(table, None) if exit_depth is None else exit_depth
    n = torch.arange(len(exit_depth))
    node, leaf = table["node"][n, exit_depth].tolist(), table["leaf"][n, exit_depth].tolist()
    return [table["nodes"][i] + ("" if is_leaf else f"/{STOP}") for i, is_leaf in zip(node, leaf)]


def report(table: dict) -> dict:
    """final.json's routing fields: every exit on all samples, where routing sits against their
    hull, and per group of samples (easy / hard on the synthetic set) depth, top-1 and leaves."""
    fixed, n = fixed_depth_points(table), torch.arange(len(table["label"]))
    last = table["leaf"].float().argmax(1)  # (N,) each sample's leaf depth
    depth = juliet_exits(table, None)
    top1 = score(table, depth)
    hull = hull_top1(fixed, top1["macs"])
    at = [p["top1"] for p in fixed]
    out = {"test_exits_all_samples": fixed,
           "test_exits_nondecreasing": all(b >= a - 1.0 for a, b in zip(at, at[1:])),
           "test_hull_top1_at_executed_macs": hull,
           "test_top1_above_hull": None if hull is None else top1["top1"] - hull}
    if "group" not in table:
        return out
    leaves, groups, out["test_groups"] = leaf_ids(table, depth), table["group"], {}
    for g in sorted(set(groups)):
        mask = torch.tensor([x == g for x in groups])
        hits = lambda d, mask=mask: 100 * float(table["correct"][n, d][mask].float().mean())
        out["test_groups"][g] = {
            "samples": int(mask.sum()), "mean_depth": float(depth[mask].float().mean()),
            "top1": hits(depth), "exits_top1": [hits(last.clamp(max=p["depth"])) for p in fixed],
            "leaves": dict(collections.Counter(lf for lf, m in zip(leaves, mask.tolist()) if m))}
    return out


def collapse_message(leaf_counts: dict, n_leaves: int, share: float = 0.95) -> str | None:
    """One line when one leaf takes >= `share` of the samples while the trie has several leaves."""
    n = sum(leaf_counts.values())
    leaf, top = max(leaf_counts.items(), key=lambda kv: kv[1], default=(None, 0))
    if n_leaves < 2 or not n or top / n < share:
        return None
    return (f"routing has collapsed: {100 * top / n:.1f}% of {n} samples end at {leaf} "
            f"while the trie has {n_leaves} leaves")
