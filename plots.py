"""Every figure Juliet writes: a run's curves, node usage and trie; its routing; the compute knob
(paper §5.3 "Profiling outputs", Fig. 2; docs/results.md "Per-sample routing"). matplotlib
Figures (no pyplot, no display needed), PNG files.

    plot_run(out, history, model, final)      accuracy.png; node_usage.png, trie.png (Juliet runs)
    plot_routing(out, table, leaves, dataset) routing.png (class / group x leaf), leaf_samples.png
    plot_curve(path, curve_report)            curve.png: top-1 vs executed MACs, knob, baselines
    plot_selector_curves(out, grid)           selector_curves.png: the §5.3 ablation grid's Fig. 3
    plot_top1_per_gflop(path, groups)         top1_per_gflop.png: Fig. 4/5 (profile.py --table,
                                              train_imagenet.py)
    plot_energy(path, logs)                   energy.png: Fig. 6 (train_imagenet.py)
    plot_pareto, plot_importances             pareto.png, importances.png: §6.2 sweep (sweep.py)
"""

import contextlib
import glob
import itertools
import os

import numpy as np

import runs
from routers import SELECTORS
from trie import STOP, JulietNet


@contextlib.contextmanager
def figure(path: str, figsize: tuple, *shape, **kwargs):
    """The axes of a new figure (matplotlib's Figure: no pyplot, no display needed); on leaving
    the block, laid out and written atomically (runs.atomic_write: sweep workers ending together
    each publish a whole PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    yield fig.subplots(*shape, **kwargs)
    runs.atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))


def train_val(ax, logs: list[dict], key: str, **labels) -> None:
    """key.format(part) per epoch, the train and the val part, with a legend."""
    for part, style in (("train", "o-"), ("val", "s-")):
        ax.plot([h["epoch"] for h in logs], [h[key.format(part)] for h in logs], style, label=part)
    ax.set(xlabel="epoch", **labels)
    ax.legend()


def plot_run(out: str, history: list, model, final: dict) -> None:
    """accuracy.png (Fig. 2 style curves); for Juliet also node_usage.png and trie.png (test
    traffic)."""
    if history:
        with figure(os.path.join(out, "accuracy.png"), (5, 3.5)) as ax:
            train_val(ax, history, "{}_top1", ylabel="top-1 (%)",
                      title=os.path.basename(os.path.abspath(out)))
    if not isinstance(model, JulietNet):
        return
    visits, n = final["test_node_visits"], max(1, final["test_samples"])
    ids = [node.node_id for node in model.nodes()]
    with figure(os.path.join(out, "node_usage.png"), (6, 0.25 * len(ids) + 1)) as ax:
        ax.barh(ids[::-1], [100 * visits.get(i, 0) / n for i in ids[::-1]])
        ax.set(xlabel="test samples entering the node (%)", title="node usage")
    with figure(os.path.join(out, "trie.png"), (max(4, 0.9 * len(model.leaves())), 4)) as ax:
        draw_trie(ax, model, {k: v / n for k, v in visits.items()})


def draw_trie(ax, model, share: dict) -> None:
    """Leaves left to right, parents centred over their children; size and colour show the traffic
    share."""
    pos = {}  # node id -> (x, y)
    next_x = itertools.count()  # the leaves' x, left to right

    def place(node, level):
        xs = [place(k, level + 1) for k in node.branches.values()]
        pos[node.node_id] = (sum(xs) / len(xs) if xs else next(next_x), -level)
        return pos[node.node_id][0]

    place(model.root, 0)
    for node in model.nodes():
        for k in node.branches.values():  # ([x0, x1], [y0, y1]), as wide as k's traffic
            ax.plot(*zip(pos[node.node_id], pos[k.node_id]), "-", color="0.6",
                    lw=0.5 + 4 * share.get(k.node_id, 0), zorder=1)
    nodes = list(model.nodes())
    s = [share.get(n.node_id, 0) for n in nodes]
    ax.scatter(*zip(*[pos[n.node_id] for n in nodes]), s=[60 + 600 * v for v in s], c=s,
               cmap="viridis", vmin=0, vmax=1, marker="o", edgecolors="k", zorder=2)
    for n, v in zip(nodes, s):
        ax.annotate((STOP if n.is_stop else n.node_id) + f"\n{100 * v:.0f}%", pos[n.node_id],
                    textcoords="offset points", xytext=(0, -22), ha="center", fontsize=7)
    ax.set_title("trie, share of test samples per node")
    ax.axis("off")


def plot_routing(out_dir: str, table: dict, leaves: list[str], dataset) -> None:
    """routing.png: share of each class's (and each group's) test samples per leaf;
    leaf_samples.png: test images that ended at each leaf. `table`: exits.exit_table's labels and
    groups; `leaves`: each sample's leaf (exits.leaf_ids); `dataset`: the test set (a Subset's base
    names the classes)."""
    base, indices = getattr(dataset, "base", dataset), getattr(dataset, "indices", None)
    classes = getattr(base, "classes", None)
    names = sorted(set(leaves), key=lambda s: (s.count("/"), s))
    rows = [("class", [str(c) for c in table["label"].tolist()])]
    if "group" in table:
        rows.append(("group", table["group"]))
    path = os.path.join(out_dir, "routing.png")
    with figure(path, (3 + 1.2 * len(names) * len(rows), 4.5), 1, len(rows), squeeze=False) as axes:
        for ax, (what, keys) in zip(axes[0], rows):
            kinds = sorted(set(keys), key=lambda k: (len(k), k))
            m = np.zeros((len(kinds), len(names)))
            np.add.at(m, ([kinds.index(k) for k in keys], [names.index(x) for x in leaves]), 1)
            m /= m.sum(1, keepdims=True)
            ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
            labels = [classes[int(k)] if what == "class" and classes else k for k in kinds]
            ax.set_yticks(range(len(kinds)), labels, fontsize=7)
            for (i, j), v in np.ndenumerate(m):
                colour = "w" if v < 0.5 else "k"
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color=colour)
            ax.set(title=f"test samples per leaf (% of each {what})", xlabel="leaf")
    k = 8  # images shown per leaf
    path = os.path.join(out_dir, "leaf_samples.png")
    with figure(path, (k * 0.9, len(names) + 0.3), len(names), k, squeeze=False) as axes:
        for ax in axes.flat:
            ax.axis("off")
        for row, leaf in zip(axes, names):
            for ax, i in zip(row, (i for i, x in enumerate(leaves) if x == leaf)):  # the first k
                ax.imshow(base[indices[i] if indices is not None else i][0])
            row[0].set_title(f"{leaf} ({leaves.count(leaf)})", fontsize=7, loc="left")


def plot_curve(path: str, rep: dict) -> None:
    """curve.png: top-1 against executed MACs per sample for the knob, its baselines and the static
    backbone."""
    with figure(path, (6, 4.2)) as ax:
        xy = lambda pts: ([p["macs"] / 1e6 for p in pts], [p["top1"] for p in pts])
        ax.plot(*xy(rep["juliet_curve"]), "-", label="Juliet, stop threshold t (one checkpoint)")
        confidence = sorted(rep["confidence_curve"], key=lambda p: p["macs"])
        ax.plot(*xy(confidence), "--", label="confidence early exit (same exits)")
        ax.plot(*xy(rep["fixed_hull"]), ":", color="0.4", label="fixed-depth exits: hull")
        ax.plot(*xy(rep["fixed_depth"]), "x", color="0.4")
        where = "held-out operating point" if rep.get("stop_threshold") is not None else \
            f"its stop rule ({rep.get('stop_rule', 'argmax')})"
        ax.plot(*xy([rep["juliet_top1_policy"]]), "*", ms=12, label=f"Juliet, {where}")
        if rep["static"].get("top1") is not None:
            ax.plot(*xy([rep["static"]]), "D", label="static backbone")
        ax.set(xlabel="executed MACs per sample (M)", ylabel="test top-1 (%)",
               title="accuracy vs compute")
        ax.set_ylim(max(0, min(p["top1"] for p in rep["fixed_depth"]) - 5), 100.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")


def selector_curve(out: str, grid: list, sel: str):
    """Fig. 3's line for one selector, {epoch: val top-1}, and its label: the selector's top1/both
    run (the paper's default setting) when it ran, else the per-epoch mean of its runs; None when
    none ran."""
    files = {(policy, mode): glob.glob(os.path.join(out, f"{s}-{policy}-{mode}", "epoch_*.json"))
             for s, policy, mode in grid if s == sel}  # each of its runs' epoch logs
    curves = {run: {log["epoch"]: log["val_top1"] for log in map(runs.read_json, logs)}
              for run, logs in files.items() if logs}
    if ("top1", "both") in curves:
        return curves["top1", "both"], f"{sel} (top1, both)"
    if not curves:
        return None
    mean = {e: sum(c[e] for c in curves.values() if e in c) / sum(e in c for c in curves.values())
            for e in sorted(set().union(*curves.values()))}
    return mean, f"{sel} (mean of {len(curves)} runs)"


def plot_selector_curves(out: str, grid: list) -> None:
    """selector_curves.png in the ablation directory `out`: val top-1 per epoch of each selector
    (Fig. 3)."""
    with figure(os.path.join(out, "selector_curves.png"), (5.5, 4)) as ax:
        for sel in SELECTORS:
            if (line := selector_curve(out, grid, sel)) is not None:  # (curve, label)
                ax.plot(*zip(*sorted(line[0].items())), "o-", label=line[1])
        ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="selector architectures (Fig. 3)")
        ax.legend(fontsize=7)


def plot_top1_per_gflop(path: str, groups: dict, title: str = "") -> str:
    """Fig. 4/5 bars: test top-1 (%) per GFLOP (THOP MACs), one group per model and one bar per FLOP
    convention: groups = {model: {convention: (top-1 %, GMACs)}} (profile.py --table;
    train_imagenet.py against Fig. 5's)."""
    # the FLOP conventions, in the order they first appear
    series = list(dict.fromkeys(s for bars in groups.values() for s in bars))
    width = 0.8 / max(1, len(series))
    with figure(path, (max(4, 1.4 * len(groups)), 3.5)) as ax:
        for k, s in enumerate(series):
            at = [(i, bars[s]) for i, bars in enumerate(groups.values()) if s in bars]
            offset = (k - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i, _ in at], [t / g for _, (t, g) in at], width, label=s)
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, fontsize=7)
        ax.set(ylabel="test top-1 (%) per GFLOP", title=title)
        ax.legend(fontsize=7)
    return path


def plot_energy(path: str, logs: list[dict]) -> None:
    """Fig. 6: NVML energy per epoch, train and val, in joules and joules per image."""
    with figure(path, (9, 3.5), 1, 2) as (a, b):
        train_val(a, logs, "energy_{}_j", ylabel="energy (J)", title="NVML energy per epoch")
        b.plot([h["epoch"] for h in logs], [h["energy_train_j_per_image"] for h in logs], "o-")
        status = logs[-1]["energy_train_status"] or "NVML"
        b.set(xlabel="epoch", ylabel="J / image", title=f"train ({status})")


def pareto_front(points: list) -> list:
    """Indices of the (MACs, accuracy) points that no other point beats on both: fewer MACs, higher
    accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    # best[k]: the highest accuracy of the points before the k-th (in that order)
    best = list(itertools.accumulate((points[i][1] for i in order), max, initial=-float("inf")))
    return [i for k, i in enumerate(order) if points[i][1] > best[k]]


def plot_pareto(path: str, points: list, numbers: list, states: list,
                static_macs: float | None) -> None:
    """pareto.png (§6.2 sweep): each finished trial's (executed MMACs, val top-1 %), the Pareto
    front numbered."""
    front, xy = pareto_front(points), np.reshape(points, (-1, 2))  # xy.T: the x and the y
    with figure(path, (5.5, 4)) as ax:
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            mine = [s == state for s in states]
            ax.scatter(*xy[mine].T, marker=marker, c="0.55", label=state.lower())
        ax.plot(*xy[front].T, "o-", c="C3", label="Pareto front")
        for i in front:
            ax.annotate(str(numbers[i]), points[i], textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if static_macs is not None:
            ax.axvline(static_macs, ls="--", c="0.3", lw=0.8, label="static backbone")
        ax.set(xlabel="expected executed MACs per sample (M, val)", ylabel="val top-1 (%)",
               title=f"§6.2 sweep: {len(points)} finished trials")
        ax.legend(fontsize=7)


def plot_importances(path: str, importances: dict, n_complete: int) -> None:
    """importances.png (§6.2 sweep): each hyperparameter's importance for L."""
    with figure(path, (5, 3)) as ax:
        ax.barh(list(importances)[::-1], list(importances.values())[::-1])
        ax.set(xlabel="importance for L (PED-ANOVA, Optuna default)",
               title=f"{n_complete} completed trials")
