"""profile.py: Juliet's profiler (paper §5.1, §5.2, §5.3, §6.1, Tables 4-5), and a superset of
the standard library's `profile`.

    python profile.py --backbone resnet18 --static [--input-size 32] [--json]   # a static model
    python profile.py --backbone resnet18 [--selector mlp] [--json]             # a fresh chain
    python profile.py runs/<name> [--json]         # a finished run on its test set
    python profile.py --table runs/a runs/b ...    # Table 4, and the Fig. 4/5-style plot
    python profile.py --bench --backbone resnet18 [--batch 128] [--run runs/x]  # Table 5
    python profile.py runs/<juliet> --curve [--baseline runs/<static>] [--budget MMACS]  # the knob
    python profile.py runs/<juliet> --calibrate [--stop-tolerance 1]  # refit the operating point

The counting conventions (FLOPs both ways, params, memory) live in measure.py, energy in energy.py;
this script applies them to fresh models and finished runs and prints the tables. `--json` prints
one JSON object and nothing else. Profile keys (measure.model_profile): dataset, input_size,
num_classes, params, params_thop, flops_paper_convention_macs, flops_paper_convention_note, proxy,
nvml_available, nvml_status, counters, and for a trie paper_convention_path. A fresh model adds
backbone, static, selector, memory {train, inference} and, for a trie, paths {leaf: {thop_macs,
flop_counter_macs}}; a run adds backbone, expected_macs_per_sample, params_executed and, for a
trie, expected_macs_samples, paths {leaf: {count, freq, macs}} and nodes {id: {visits, freq}}.

The standard library's `profile` shares this file's name; `cProfile` imports it and torch imports
`cProfile` (torch._dynamo). With the repo first on sys.path `import profile` finds this file, so it
loads the standard library's profile.py under another name and re-exports what `cProfile` needs
(`run`, `runctx`, `Profile`, `_Utils`). Run as a script it registers itself as `profile` before
torch imports. Top-level imports stay plain `import x` and the sibling modules are imported inside
the functions that use them: this module may run while torch itself is still importing.
"""

import json
import os
import runpy
import sys
import sysconfig

_stdlib = runpy.run_path(os.path.join(sysconfig.get_paths()["stdlib"], "profile.py"),
                         run_name="_stdlib_profile")
run, runctx, Profile, _Utils = (_stdlib[name] for name in ("run", "runctx", "Profile", "_Utils"))
if __name__ == "__main__":  # torch's `import cProfile` -> `import profile` must find this copy
    sys.modules.setdefault("profile", sys.modules[__name__])

import torch  # noqa: E402  (may be half-imported here: touch no torch attribute at import time)

_NAMES = {"resnet18": ("ResNet", "-{}18"), "resnet101": ("ResNet", "-{}101"),  # Table 4's names
          "densenet121": ("DenseNet", "-{}121"), "efficientnet_b0": ("EfficientNet", "-{}B0")}


# ----------------------------------------------------------------------------- runs and models


def profile_run(run_dir, device="cpu", max_batches=None) -> dict:
    """Paper-convention and expected executed MACs of a finished run on its test set; merged into
    runs/<name>/model_profile.json."""
    import checkpoints
    import measure
    import runs
    from data import run_test_loader

    config, model = checkpoints.load_run(run_dir, device)  # checked before anything is written
    with runs.claim_run_dir(run_dir, new=False):  # one writer: not while training holds the run
        path = os.path.join(run_dir, "model_profile.json")
        saved = runs.read_json(path, {})
        out = {"backbone": config["backbone"], **measure.model_profile(
            model, config["dataset"], config["input_size"], config["num_classes"])}
        if out["proxy"]:
            counts = measure.count_leaves(model, run_test_loader(config), device, max_batches)
            exp = measure.expected_macs(model, counts, config["input_size"])
            out.update(expected_macs_per_sample=exp["expected_macs_per_sample"],
                       expected_macs_samples=exp["samples"], paths=exp["paths"],
                       nodes=exp["nodes"], params_executed=measure.executed_params(model, counts))
        else:  # every sample runs the same modules: the one-dummy count is the executed cost
            out.update(expected_macs_per_sample=out["flops_paper_convention_macs"],
                       params_executed=out["params"])
        runs.write_json(path, {**saved, **out})
    return out


def table_rows(run_dirs) -> list[dict]:
    """One Table 4 row per run. Training FLOPs = 3 x F_inf x |D_train| per epoch (§5.1); Table 4
    also multiplies by the epochs (ResNet-18: 3 x 37.22 M x 45,000 x 60 = 301.5 T), so do we."""
    import runs

    checked, keys = [], ("expected_macs_per_sample", "params", "flops_paper_convention_macs")
    for run_dir in run_dirs:  # every run's small files first: a damaged one fails before any work
        final = runs.read_config(run_dir) | runs.read_json(os.path.join(run_dir, "final.json"), {})
        path, ckpt = (os.path.join(run_dir, f) for f in ("model_profile.json", "checkpoint.pt"))
        p = runs.read_json(path, {}) if os.path.exists(ckpt) else {}
        numbers = (final.get("test_top1") or 0, final.get("train_size", 0), final.get("epochs", 1),
                   *(p.get(k, 0) for k in keys))
        if not all(isinstance(v, (int, float)) for v in numbers):
            raise runs.UsageError(f"{run_dir}: final.json or model_profile.json holds a value that "
                                  "is not a number")
        stale = not all(k in p for k in (*keys, "proxy")) or \
            os.path.getmtime(ckpt) > os.path.getmtime(path)  # no profile yet, or a newer checkpoint
        checked.append((run_dir, final, None if stale else p))
    return [table_row(run_dir, final, p or profile_run(run_dir)) for run_dir, final, p in checked]


def table_row(run_dir: str, final: dict, p: dict) -> dict:
    family, v = _NAMES.get(final["backbone"], (final["backbone"], " {}"))  # v: "-{}18"
    scale = 3 * final.get("train_size", float("nan")) * final.get("epochs", 1) / 1e12
    return {"run": run_dir, "family": family, "variant": family + v.format("Juliet-" * p["proxy"]),
            "params_m": p["params"] / 1e6, "paper_macs_m": p["flops_paper_convention_macs"] / 1e6,
            "expected_macs_m": p["expected_macs_per_sample"] / 1e6,
            "train_t_paper": scale * p["flops_paper_convention_macs"],
            "train_t_expected": scale * p["expected_macs_per_sample"],
            "top1": final.get("test_top1")}


def profile_fresh(backbone, static=False, input_size=32, num_classes=10, selector="transformer",
                  batch=128, device="cpu") -> dict:
    """A freshly built model: params, paper-convention MACs, per-path THOP vs FlopCounterMode,
    peak memory."""
    import measure
    from backbones import make_backbone, static_model
    from bench import step_peak_memory
    from trie import JulietNet

    torch.manual_seed(0)
    model = (static_model(backbone, num_classes) if static else
             JulietNet(make_backbone(backbone, num_classes), selector=selector)).to(device)
    out = {"backbone": backbone, "static": static, "selector": None if static else selector,
           **measure.model_profile(model, None, input_size, num_classes)}
    if not static:
        flop = measure.node_macs(model, input_size, measure.flop_counter_macs)
        flop = measure.path_macs_table(model, input_size, flop)
        out["paths"] = {leaf: {"thop_macs": macs, "flop_counter_macs": flop[leaf]}
                        for leaf, macs in measure.path_macs_table(model, input_size).items()}
    out["memory"] = {mode: step_peak_memory(model, input_size, batch, mode == "train", device)
                     for mode in ("train", "inference")}
    return out


def _summary(p) -> str:
    """A human-readable report of profile_fresh or profile_run (markdown tables)."""
    M = lambda v: f"{v / 1e6:.2f}"  # noqa: E731
    size, path = p["input_size"], f" -- follows one path only ({p.get('paper_convention_path')})"
    lines = [f"{p['backbone']} ({'Juliet' if p['proxy'] else 'static'}): params {M(p['params'])} M",
             f"paper-convention FLOPs (THOP MACs, one 1x3x{size}x{size} dummy): "
             f"{M(p['flops_paper_convention_macs'])} M" + (path if p["proxy"] else "")]
    if "expected_macs_per_sample" in p:
        over = f"over {p['expected_macs_samples']} test samples" if p["proxy"] else \
            "(static: every sample alike)"
        lines.append(f"expected executed MACs per sample: {M(p['expected_macs_per_sample'])} M "
                     f"{over}; executed params {M(p['params_executed'])} M")
    paths = p.get("paths", {})
    if paths and "thop_macs" in next(iter(paths.values())):
        lines += ["", "| leaf | THOP MACs (M) | FlopCounterMode/2 (M) | difference |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {M(v['thop_macs'])} | {M(v['flop_counter_macs'])} | "
                  f"{v['thop_macs'] / v['flop_counter_macs'] - 1:+.2%} |" for k, v in paths.items()]
    elif paths:
        lines += ["", "| leaf | samples | freq | path MACs (M) |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['count']} | {v['freq']:.3f} | {M(v['macs'])} |"
                  for k, v in paths.items()]
        lines += ["", "| node | visits | freq |", "|---|---|---|"]
        lines += [f"| {k} | {v['visits']} | {v['freq']:.3f} |" for k, v in p["nodes"].items()]
    for mode, m in p.get("memory", {}).items():
        lines.append(f"peak memory, {mode} (batch {m['batch']}, {m['device']}): "
                     f"{m['peak_step_mb']:.1f} MB during the step + {m['before_step_mb']:.1f} MB "
                     f"before it = {m['peak_total_mb']:.1f} MB")
    return "\n".join(lines + [f"NVML: {p['nvml_status']}"])


# ----------------------------------------------------------------------------- command line


def build_parser():
    import runs
    from backbones import BACKBONES

    p = runs.Parser(prog="profile.py", description=__doc__.split("\n\n")[0])  # bad flags: 1 line
    p.add_argument("run_dir", nargs="?", metavar="RUN", help="a finished run (runs/<name>)")
    p.add_argument("--backbone", choices=BACKBONES, help="a fresh model")
    p.add_argument("--static", action="store_true", help="the static baseline, not a Juliet chain")
    p.add_argument("--input-size", type=runs.positive, default=32, help="32: CIFAR-10 (§5.1); "
                   "224: ImageNet (§5.2)")
    p.add_argument("--num-classes", type=runs.positive, default=10)
    p.add_argument("--selector", default="transformer",
                   help="transformer (§4.1), mlp, conv (§5.3); --bench --run: the run's own")
    p.add_argument("--batch", type=runs.positive, default=128, help="batch of memory and --bench")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=runs.positive, help="RUN: count paths on N batches")
    p.add_argument("--table", nargs="+", metavar="RUN", help="Table 4 of these runs, and Fig. 4/5")
    p.add_argument("--out", help="--table: PNG path (default: the first run's top1_per_gflop.png)")
    p.add_argument("--bench", action="store_true", help="Table 5: wall time, static vs Juliet")
    p.add_argument("--repeats", type=runs.positive, default=15)
    p.add_argument("--warmup", type=runs.nonneg, default=3)
    p.add_argument("--run", dest="bench_run", help="--bench: also time this run's trained trie")
    p.add_argument("--curve", action="store_true", help="RUN: accuracy vs executed MACs over stop "
                   "thresholds -> RUN/curve.json, curve.png")
    p.add_argument("--baseline", metavar="RUN", help="--curve: the static run to compare with")
    p.add_argument("--budget", type=runs.positive_float, metavar="MMACS", help="--curve: a budget "
                   "in M MACs per sample; the threshold is chosen on the validation set")
    p.add_argument("--calibrate", action="store_true", help="RUN: refit its stop decisions and "
                   "operating point on its validation set, rewriting RUN/model.pt (before --curve)")
    p.add_argument("--stop-tolerance", type=runs.nonneg_float, default=0.5, help="--calibrate: "
                   "validation points the operating point may lose against full depth")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    return p


def main(argv=None):
    import runs

    args = build_parser().parse_args(argv)
    try:
        out, text = _dispatch(args)
    except runs.UsageError as e:
        runs.fail(str(e), "profile.py", 2)
    print(json.dumps(out, indent=2) if args.json else text)
    return out


def _dispatch(args):
    from runs import UsageError

    if args.table:
        return _table(args)
    if args.bench:
        from bench import benchmark, format_bench

        if args.backbone is None and args.bench_run is None:
            raise UsageError("--bench needs --backbone or --run")
        r = benchmark(args.backbone, args.input_size, args.batch, args.repeats, args.warmup,
                      args.device, args.bench_run, args.num_classes, args.selector)
        ops = [f"\n{name}: one train step, top operators by self CPU time\n{m['top_ops']}"
               for name, m in r["models"].items() if "top_ops" in m]  # batch 1: no train step
        return r, "\n".join([format_bench(r), *ops])
    if args.calibrate or args.curve:
        return _knob(args)
    if args.run_dir is not None:
        p = profile_run(args.run_dir, args.device, args.max_batches)
    elif args.backbone is not None:
        p = profile_fresh(args.backbone, args.static, args.input_size, args.num_classes,
                          args.selector, args.batch, args.device)
    else:
        raise UsageError("give a run directory, --backbone NAME, --table RUN [RUN ...] or --bench")
    return p, _summary(p)


def _table(args):
    from plots import plot_top1_per_gflop

    rows = table_rows(args.table)
    groups = {r["variant"]: {"paper convention": (r["top1"], r["paper_macs_m"] / 1e3),
                             "executed": (r["top1"], r["expected_macs_m"] / 1e3)}
              for r in rows if r["top1"]}
    png = plot_top1_per_gflop(args.out or os.path.join(args.table[0], "top1_per_gflop.png"), groups)
    out = ["| family | variant | params (M) | inference FLOPs (M; paper convention: THOP MACs, "
           "one dummy) | expected executed MACs (M) | training FLOPs (T; paper conv.) | "
           "training (T; executed) | test top-1 (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.2f}"
        out.append(f"| {r['family']} | {r['variant']} | {r['params_m']:.2f} | "
                   f"{r['paper_macs_m']:.2f} | {r['expected_macs_m']:.2f} | "
                   f"{r['train_t_paper']:.2f} | {r['train_t_expected']:.2f} | {top1} |")
    return {"rows": rows, "plot": png}, "\n".join(out) + f"\n\nplot: {png}"


def _knob(args):
    """--calibrate: refit a trained trie's stop decisions and operating point on its validation set
    (calibrate.calibrate_net), e.g. for another tolerance, and rewrite its model.pt with them.
    --curve: the compute knob of the checkpoint: test accuracy vs executed MACs over stop
    thresholds, against the fixed-depth exits, the confidence exit and the static backbone
    (--baseline: its run directory, for its test top-1). With --budget (M MACs per sample) the
    threshold is chosen on the validation set and its test point reported. Writes curve.json and
    curve.png."""
    import calibrate
    import checkpoints
    import data
    import exits
    import measure
    import plots
    import runs
    from backbones import static_model

    flag = "--calibrate" if args.calibrate else "--curve"
    run_dir, device = args.run_dir, args.device
    if run_dir is None:
        raise runs.UsageError(f"{flag} needs a run directory: python profile.py runs/<name> {flag}")
    config, model = checkpoints.load_run(run_dir, device)  # checked before anything is written
    if (args.calibrate or args.budget is not None) and data.val_is_test(config):
        fits = "--calibrate" if args.calibrate else "--budget"
        raise runs.UsageError(f"{run_dir} validates on its test set (ImageNet with holdout 0), so "
                              f"{fits} would fit on the test set; train with --set holdout=50000")
    if not hasattr(model, "root"):
        why = ("it has no stop decisions to calibrate" if args.calibrate else
               "the curve needs a Juliet run")
        raise runs.UsageError(f"{run_dir} is a static run: {why}")

    def validation_loader():  # the run's validation set, with evaluation transforms
        sets = data.imagenet_datasets if config["dataset"] == "imagenet" else data.cifar_datasets
        return data.make_loader(sets(config)[1], config, shuffle=False)
    size, text = config["input_size"], ""
    if args.calibrate:
        cal = calibrate.calibrate_net(model, validation_loader(), device, args.stop_tolerance, size)
        with runs.claim_run_dir(run_dir, new=False):
            final = runs.read_json(os.path.join(run_dir, "final.json"), {})
            epoch = final.get("evaluated_checkpoint", {}).get("epoch")
            checkpoints.save_model(run_dir, model, epoch)
        p = cal["val_operating_point"]
        text = (f"calibrated on val: operating point t = {p['t']:.4f} ({p['macs'] / 1e6:.2f} M "
                f"MACs, {p['top1']:.2f}% val top-1, tolerance {args.stop_tolerance} points)\n")
        if not args.curve:
            return cal, text.rstrip()
    top1 = runs.read_json(os.path.join(args.baseline, "final.json"), need=("test_top1",))[
        "test_top1"] if args.baseline else None
    static = {"macs": measure.paper_macs(static_model(config["backbone"], config["num_classes"]),
                                         size)[0], "top1": top1}
    table = exits.exit_table(model, data.run_test_loader(config), device, size, args.max_batches)
    rep = exits.curve_report(table, static)
    text += exits.format_curve(rep)
    if args.budget is not None:
        val = exits.exit_table(model, validation_loader(), device, size, args.max_batches)
        try:
            t = exits.threshold_for_budget(val, args.budget * 1e6)
        except ValueError as e:
            raise runs.UsageError(str(e)) from None
        b = rep["budget"] = {"budget_macs": args.budget * 1e6, "t": t,
                             "val": exits.score(val, exits.juliet_exits(val, t)),
                             "test": exits.score(table, exits.juliet_exits(table, t))}
        text += (f"\nbudget {b['budget_macs'] / 1e6:.2f} M MACs: t = {b['t']} on val "
                 f"({b['val']['macs'] / 1e6:.2f} M, {b['val']['top1']:.2f}%) -> "
                 f"test {b['test']['macs'] / 1e6:.2f} M, {b['test']['top1']:.2f}%")
    rep["run_dir"] = run_dir
    with runs.claim_run_dir(run_dir, new=False):  # one writer: not while training holds the run
        runs.write_json(os.path.join(run_dir, "curve.json"), rep)
        plots.plot_curve(os.path.join(run_dir, "curve.png"), rep)
    return rep, text + f"\nwrote {os.path.join(run_dir, 'curve.json')} and curve.png"


if __name__ == "__main__":
    main()
