"""Measurement: FLOPs both ways (measure.py), memory and wall time (bench.py), energy (energy.py), and the profile.py CLI."""

import collections
import copy
import json
import math
import subprocess
import sys
import time

import pytest
import torch

import bench
import checkpoints
import data
import deploy
import energy
import measure
import profile as prof  # Juliet's profile.py, first on sys.path
import train_cifar
from backbones import make_backbone, static_model
from conftest import REPO, cifar_args, read_json, routed_trie, varied_batch
from routers import make_selector
from trie import STOP, JulietNet

assert hasattr(prof, "profile_run"), "the stdlib profile module shadowed Juliet's profile.py"

# ----------------------------------------------------------------------------- FLOPs (MACs)


@pytest.fixture(scope="module")
def routed():
    """A routed resnet18 trie and a batch of 32 varied images it sends down at least 3 different paths."""
    net = routed_trie(make_backbone("resnet18"))
    x = varied_batch(32, torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, paths = net(x, return_paths=True)
    assert len(set(paths)) >= 3, paths
    return net, x, paths




def test_paper_convention_reproduces_table4_baselines():
    """Table 4's static baselines, asserted here only: elsewhere the tests compare with this count."""
    expected = {"resnet18": (37.22, 11.18), "densenet121": (59.11, 6.96)}
    for name, (macs_m, params_m) in expected.items():
        macs, params = measure.paper_macs(static_model(name, num_classes=10), input_size=32)
        assert (round(macs / 1e6, 2), round(params / 1e6, 2)) == (macs_m, params_m), name


def test_thop_counts_the_selectors_attention_by_hand(monkeypatch):
    """A full-depth chain path runs 4 transformer selectors over L = 1 feature + 2 branch tokens; without our
    MultiheadAttention rule THOP 0.1.1 counts each as 0."""
    torch.manual_seed(0)
    E, L = 16, 3
    net = JulietNet(make_backbone("resnet18"), selector="transformer", stop_go="selector", d_model=E,
                    n_head=2)
    leaf = "0/0/0/0/0"
    with_op = measure.path_macs(net, leaf)
    monkeypatch.setattr(measure, "thop_custom_ops", dict)
    without = measure.path_macs(net, leaf)
    per_mha = 4 * L * E * E + 2 * L * L * E  # Q, K, V, out projections + QK^T + AV
    assert with_op - without == 4 * per_mha


def test_every_selector_module_is_counted():
    """Exact THOP counts of whole selectors: LayerNorm 4/elt (affine), Linear in x out, depthwise conv, FF, MHA."""
    C, S, d, H = 64, 32, 16, 4
    f, sig = torch.randn(1, C, H, H), torch.randn(2, S)  # 2 stage children + stop: K = 3
    K, L = 3, 4
    branches = 4 * 2 * S + 2 * S * d  # sig_proj: LayerNorm over (2, S) + Linear
    transformer = (4 * C + C * d + branches + 4 * L * d * d + 2 * L * L * d  # feature token, branches, MHA
                   + 2 * L * d * 2 * d + 2 * 4 * L * d + K * d)  # feed-forward, norm1/norm2, head on K outputs
    conv = C * H * H * 9 + 4 * C + C * d + branches  # depthwise 3x3, LayerNorm, Linear
    mlp = 4 * C + C * d + d * d + branches
    for name, want in (("transformer", transformer), ("conv", conv), ("mlp", mlp)):
        sel = make_selector(name, C, S, d, n_head=2).eval()
        assert measure._thop(sel, f, sig, True)[0] == want, name


def test_expected_macs_equal_the_mean_of_per_sample_executed_macs(routed):
    """Independent check: each sample alone through the real trie under THOP counts what it executed."""
    net, x, paths = routed
    counts = measure.count_leaves(net, [(x, torch.zeros(len(x)))], "cpu")
    assert sum(counts.values()) == len(x) and len(counts) >= 3
    exp = measure.expected_macs(net, counts)
    per_sample = [measure.paper_macs(net, x=x[i:i + 1])[0] for i in range(len(x))]
    assert exp["expected_macs_per_sample"] == pytest.approx(sum(per_sample) / len(x), rel=1e-12)  # float only
    assert len(set(per_sample)) >= 3  # different paths, different costs
    assert exp["nodes"]["0"]["visits"] == len(x) and exp["nodes"]["0"]["freq"] == 1.0
    assert exp["nodes"]["0/0"]["visits"] == sum(c for leaf, c in counts.items() if leaf.startswith("0/0/"))
    assert sum(p["freq"] for p in exp["paths"].values()) == pytest.approx(1.0)


def test_thop_and_flop_counter_agree_on_every_path(routed):
    net, _, _ = routed
    fc_parts = measure.node_macs(net, count=measure.flop_counter_macs)
    for leaf, macs in measure.path_macs_table(net).items():
        fc = measure.path_macs(net, leaf, parts=fc_parts)
        assert abs(macs - fc) / macs < 0.03, (leaf, macs, fc)


def test_flop_counter_sees_the_transformer_selectors():
    """In eval under no_grad the fused encoder kernel is invisible to FlopCounterMode; `countable` prevents that."""
    torch.manual_seed(0)
    net = JulietNet(make_backbone("resnet18"), selector="transformer", stop_go="selector")
    leaf = "0/0/0/0/0"
    fc_parts = measure.node_macs(net, count=measure.flop_counter_macs)
    thop_macs, fc = measure.path_macs(net, leaf), measure.path_macs(net, leaf, parts=fc_parts)
    assert abs(thop_macs - fc) / thop_macs < 0.03
    sel, f = net.root.selector, torch.randn(1, 64, 8, 8)
    with measure.countable():
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            sel(f, net.signatures(net.root), True)
    d, L = 64, 3
    assert counter.get_total_flops() / 2 >= 4 * L * d * d + 2 * L * L * d + 2 * L * d * 2 * d


def test_paper_convention_follows_the_dummys_path_only(routed):
    net, _, _ = routed
    table = measure.path_macs_table(net)
    leaf = measure.dummy_path(net)
    assert measure.paper_macs(net)[0] == table[leaf]
    assert len(set(table.values())) == len(table)  # every path costs something else


def test_executed_params(routed):
    net, _, _ = routed
    stem_only = measure.executed_params(net, {"0/stop": 5})
    want = sum(p.numel() for m in (net.root.sub, net.root.selector, net.adapters["64"], net.head)
               for p in m.parameters())
    assert stem_only == want
    everything = measure.executed_params(net, {leaf.node_id: 1 for leaf in net.leaves()})
    assert stem_only < everything <= measure.total_params(net)


# memory and wall time


def test_peak_memory_on_cpu():
    model = static_model("resnet18")
    train = bench.step_peak_memory(model, batch=8, train=True)
    infer = bench.step_peak_memory(model, batch=8, train=False)
    grads_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    assert train["peak_step_mb"] > grads_mb > infer["peak_step_mb"] > 0  # training keeps grads + activations
    assert train["peak_total_mb"] == pytest.approx(train["peak_step_mb"] + train["before_step_mb"])
    assert "excluded" in train["includes"] and train["mode"] == "train" and infer["mode"] == "inference"


def test_bench_tiny_and_its_markdown():
    r = bench.benchmark("resnet18", batch=8, repeats=2, warmup=1)
    for name in ("static", "juliet_chain"):
        assert r["models"][name]["train"]["median_s"] > 0 and r["models"][name]["inference"]["median_s"] > 0
        assert r["models"][name]["train"]["n"] == 2
        assert 0 < r["models"][name]["conv_bwd_share"] < 1
    assert r["ratios"]["juliet_chain"]["train"] > 0 and r["ratios"]["static"]["train"] == 1.0
    table = bench.format_bench(r)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| metric | static |") and set(lines[1]) <= set("|- ")
    assert len(lines) == 6


def test_bench_at_batch_1_times_inference_alone(capsys):
    """One image at a time is how a deployed model is called; BatchNorm cannot train on one sample,
    so --bench --batch 1 times inference only, and says so."""
    prof.main(["--bench", "--backbone", "resnet18", "--batch", "1", "--repeats", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "batch 1" in out and "| inference batch (s) |" in out and "train step" not in out


def test_inference_mode_gives_the_no_grad_logits_and_paths(routed):
    """torch.inference_mode(), the usual way to serve a model, runs the trie as no_grad does."""
    net, x, _ = routed
    with measure.evaluating(net):
        with torch.no_grad():
            a, pa = net(x, return_paths=True)
        with torch.inference_mode():
            b, pb = net(x, return_paths=True)
    assert pa == pb and torch.equal(a, b) and len(set(pa)) >= 3


def test_the_inference_breakdown_times_each_part_and_they_sum_to_the_total(routed):
    """bench.breakdown, at batch 32 and at batch 1: the stem, each stage, the selectors, the exits, the
    leaves and routing, each timed on its own (nested parts out), sum to the same passes timed whole
    within 10%; the timers are gone afterwards."""
    net, x, _ = routed
    for batches in ([x], list(x[:8, None])):
        r = bench.breakdown(net, batches, repeats=7)
        want = {"stem", "stage 1", "stage 2", "selectors", "exits", "leaves", "routing"}
        assert want <= set(r["parts_s"]) and all(v > 0 for v in r["parts_s"].values())
        assert r["sum_s"] == pytest.approx(r["total_s"], rel=0.10)
    assert not any("forward" in vars(m) for m in net.modules()) and "exit" not in vars(net)


def test_the_oracle_runs_each_leafs_samples_down_its_path_and_agrees_with_the_trie(routed):
    """The oracle of --bench: plain sequential code per leaf group gives the trie's own logits."""
    net, x, paths = routed
    infer, _ = bench.oracle_step(net, x, train=False)
    out = infer()
    assert set(out) == set(paths) and sum(len(v) for v in out.values()) == len(x)
    with torch.no_grad():
        logits = net(x)
    for leaf, got in out.items():
        idx = [i for i, p in enumerate(paths) if p == leaf]
        torch.testing.assert_close(got, logits[idx], rtol=0, atol=1e-5)
    step, opt = bench.oracle_step(copy.deepcopy(net), x, train=True)
    step()
    assert opt.state  # it trained


def test_the_served_copy_folds_each_exit_into_one_map_and_routes_and_predicts_alike(routed):
    """deploy.fold_exits: each adapter and the head become one Linear (C -> classes) in a copy; it
    gives the trie's paths and logits (to float rounding) at batch 32 and 1, the exits cost a
    fraction of their MACs, and the trie itself is untouched."""
    net, x, paths = routed
    before = copy.deepcopy(net.state_dict())
    served = deploy.fold_exits(net)
    assert not served.training and isinstance(served.head, torch.nn.Identity)
    with measure.evaluating(net), torch.inference_mode():
        want = net(x)
        logits, got = served(x, return_paths=True)
        ones = torch.cat([served(x[i:i + 1]) for i in range(4)])
    assert got == paths
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ones, want[:4], rtol=0, atol=1e-5)
    folded, full = measure.node_macs(served), measure.node_macs(net)  # at the head width: the head
    assert all(0 < folded[k]["exit"] <= full[k]["exit"] for k in full)
    assert sum(v["exit"] for v in folded.values()) < 0.2 * sum(v["exit"] for v in full.values())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_the_batch1_latency_times_each_model_on_a_block_of_images_in_turn(routed):
    """deploy.latency: a warm-up, then `block` consecutive images through one model before the
    next, so no model runs right after another with its weights (the oracle before the floor)."""
    net, x, _ = routed
    calls, models = [], {k: torch.nn.Identity() for k in ("a", "b")}
    for k, m in models.items():
        m.register_forward_pre_hook(lambda m, args, k=k: calls.append(k))
    r = deploy.latency(models, net, x[:5], warmup=1, block=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2 + ["a", "b"]
    assert {k: v["n"] for k, v in r.items()} == dict.fromkeys(("a", "b", "oracle", "oracle_exits"), 5)


def test_the_batch1_oracles_give_the_tries_logits_and_the_floor_reads_each_exit_its_rule_does(routed):
    """deploy.oracles: per image, its own path; "oracle_exits" also computes every exit the
    decisions on that path read (the floor of the batch-1 table), and nothing else."""
    net, x, paths = routed
    fns = deploy.oracles(net, x)
    with torch.no_grad():
        logits, record = net(x, return_record=True)
    read = collections.Counter(int(i) for r in record.routed if r.exit is not None for i in r.idx)
    calls = []
    net.exit = lambda f: calls.append(len(f)) or JulietNet.exit(net, f)
    try:
        with torch.inference_mode():
            for i in range(len(x)):
                for name, fn in fns.items():
                    calls.clear()
                    torch.testing.assert_close(fn(x[i:i + 1], i)[0], logits[i], rtol=0, atol=1e-5)
                    stopped = paths[i].endswith("/" + STOP)
                    want = 1 if name == "oracle" else read[i] + (not stopped)
                    assert len(calls) == want, (name, paths[i], calls)
    finally:
        del net.exit
    assert sum(read.values()) > len(x)  # decisions that read exits, on most paths more than one


def test_no_early_exit_sends_everyone_to_full_depth():
    torch.manual_seed(0)
    net = bench._no_early_exit(JulietNet(make_backbone("resnet18"), selector="mlp")).eval()
    with torch.no_grad():
        _, paths = net(torch.randn(16, 3, 32, 32), return_paths=True)
    assert set(paths) == {"0/0/0/0/0"}


# energy


def test_trapezoid_joules():
    assert energy.trapezoid_joules([0.0, 0.5, 2.0, 3.0], [40.0] * 4) == pytest.approx(120.0)  # P x T
    assert energy.trapezoid_joules([0.0, 1.0, 2.0], [0.0, 10.0, 20.0]) == pytest.approx(20.0)  # ramp: exact
    assert energy.trapezoid_joules([], []) == 0.0 and energy.trapezoid_joules([1.0], [50.0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        energy.trapezoid_joules([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="increasing"):
        energy.trapezoid_joules([0.0, 1.0, 1.0], [1.0, 1.0, 1.0])


def test_nvml_absent_gives_nan_and_the_reason():
    ok, reason = energy.nvml_status()
    if ok:
        pytest.skip("NVML is present: this test is about machines without it (CI, this CPU box)")
    assert reason.startswith(("NVML unavailable", "nvidia-ml-py not installed"))
    with energy.EnergyMeter() as meter:
        time.sleep(0.06)
    d = meter.as_dict(images=100)
    assert math.isnan(d["energy_j"]) and math.isnan(d["energy_counter_j"]) and math.isnan(d["energy_j_per_image"])
    assert d["energy_status"] == reason and meter.seconds > 0.05
    json.dumps(d)  # NaN is written as JSON NaN


def test_energy_meter_with_a_fake_nvml(monkeypatch):
    """The NVML-present path on a CPU machine: a fake pynvml at a constant 100 W whose energy counter runs too."""
    fake = type(sys)("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    t0 = time.perf_counter()
    for name, fn in {"nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
                     "nvmlSystemGetDriverVersion": lambda: "fake", "nvmlDeviceGetCount": lambda: 1,
                     "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetPowerUsage": lambda h: 100_000,
                     "nvmlDeviceGetTotalEnergyConsumption": lambda h: int((time.perf_counter() - t0) * 1e5)}.items():
        setattr(fake, name, fn)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert energy.nvml_status()[0] is True
    with energy.EnergyMeter(interval_s=0.01) as meter:
        time.sleep(0.2)
    assert len(meter._samples) >= 5
    span = meter._samples[-1][0] - meter._samples[0][0]
    assert meter.joules == pytest.approx(100 * span) and meter.counter_joules == pytest.approx(100 * span, rel=0.2)
    assert meter.as_dict(images=10)["energy_j_per_image"] == pytest.approx(meter.joules / 10)


# CLI and runs


def test_cli_static_json_keys_and_profile_py_loads_once():
    cmd = [sys.executable, "-X", "importtime", "profile.py", "--backbone", "resnet18", "--static", "--json",
           "--batch", "4"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time")]
    # torch imported cProfile, which imports `profile`: it found the running script, not a second copy of it
    assert "cProfile" in imported and "profile" not in imported
    assert "USDT" not in out.stderr and "gpuGetDeviceCount" not in out.stderr  # CPU profiling is quiet
    d = json.loads(out.stdout)
    for key in ("dataset", "input_size", "params", "flops_paper_convention_macs", "flops_paper_convention_note",
                "proxy", "nvml_available", "nvml_status", "memory", "counters"):
        assert key in d, key
    static = measure.paper_macs(static_model("resnet18", num_classes=10), input_size=32)[0]
    assert d["flops_paper_convention_macs"] == static and d["proxy"] is False  # Table 4: above
    assert d["memory"]["train"]["peak_step_mb"] > 0


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"backbone": "resnet18", "static": True, "num_classes": 10}))
    for argv in (["runs/does-not-exist"], ["--backbone", "vgg16"], [str(tmp_path)], ["--bogus-flag"]):
        with pytest.raises(SystemExit) as e:
            prof.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("profile.py: error:"), err
    out = subprocess.run([sys.executable, "profile.py", "runs/does-not-exist"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "no such run directory" in out.stderr


def test_profile_of_a_finished_run_and_table4(tmp_path, capsys):
    """A real tiny Juliet run and its static twin: the checkpoint is rebuilt from its structure, the test set
    comes through data.run_test_loader, model_profile.json is merged, and Table 4 + its plot."""
    common = ["--dataset", "synthetic", "--selector", "mlp", "--set", "synthetic_size=120"]
    juliet, static = tmp_path / "juliet", tmp_path / "static"
    final = train_cifar.main(cifar_args(juliet, *common, "--stop-tolerance", "100"))  # stops early
    train_cifar.main(cifar_args(static, *common, "--static"))
    said, collapsed = capsys.readouterr().out, final["evaluated_checkpoint"]["routing_collapsed"]
    assert "warning: epoch" not in said  # the untuned rule's routing is not the run's: --calibrate
    assert ("at the operating point calibrated on validation, routing has collapsed" in said) == collapsed

    p = prof.profile_run(str(juliet))
    # the run's executed MACs, against each test image alone through the kept model under THOP
    _, model = checkpoints.load_run(str(juliet))
    images = torch.cat([x for x, _ in data.run_test_loader(read_json(juliet / "config.json"))])
    alone = [measure.paper_macs(model, x=images[i:i + 1])[0] for i in range(len(images))]
    assert final["test_executed_macs_per_sample"] == pytest.approx(sum(alone) / len(alone), rel=1e-12)
    assert p["expected_macs_per_sample"] == pytest.approx(final["test_executed_macs_per_sample"], rel=1e-12)
    assert sum(v["count"] for v in p["paths"].values()) == read_json(juliet / "config.json")["test_size"]
    saved = read_json(juliet / "model_profile.json")
    assert saved["proxy"] is True and saved["dataset"] == "synthetic" and "expected_macs_per_sample" in saved

    prof.main([str(juliet)])
    report = capsys.readouterr().out
    assert "expected executed MACs per sample" in report and "| node | visits | freq |" in report

    prof.main(["--table", str(static), str(juliet)])
    table = capsys.readouterr().out
    assert "ResNet-18" in table and "ResNet-Juliet-18" in table and f"{final['test_top1']:.2f}" in table
    row = prof.table_rows([str(static)])[0]
    macs = read_json(static / "final.json")["flops_paper_convention_macs"]
    assert row["train_t_paper"] == pytest.approx(3 * macs * 108 * 1 / 1e12)  # 3 x F x |D_train| x epochs
    assert (static / "top1_per_gflop.png").stat().st_size > 0

    # the compute knob of one checkpoint: curve.json and curve.png, the static run as baseline (c)
    prof.main([str(juliet), "--curve", "--baseline", str(static), "--budget", "5"])
    text = capsys.readouterr().out
    curve = read_json(juliet / "curve.json")
    assert (juliet / "curve.png").stat().st_size > 0 and "| t | executed MACs (M) |" in text
    macs = [p["macs"] for p in curve["juliet_curve"]]
    assert macs == sorted(macs) and curve["macs_span"] == pytest.approx(macs[-1] / macs[0])
    assert curve["static"]["top1"] == read_json(static / "final.json")["test_top1"]
    assert curve["samples"] == read_json(juliet / "config.json")["test_size"]
    b = curve["budget"]
    assert b["val"]["macs"] <= 5e6 and 0 <= b["t"] <= 1

    # --bench on the run: static, the chain, the trained trie and its oracle, with the node profile
    one = bench.benchmark("resnet18", batch=1, repeats=1, warmup=1, run_dir=str(juliet), images=3)
    assert set(one["models"]["juliet_run"]) == {"inference"} and "n/a (batch 1)" in bench.format_bench(one)
    assert one["parts"]["1"]["batches"] == 3  # batch 1: the breakdown over the images, not one
    # the chain is the run's recipe (its selectors, its stop), only fresh
    assert one["chain_options"] == checkpoints.load_run(str(juliet), "cpu")[1].options
    r = bench.benchmark("resnet18", batch=8, repeats=1, warmup=1, run_dir=str(juliet), images=3)
    assert set(r["models"]) == {"static", "juliet_chain", "juliet_run", "oracle"}
    assert set(r["latency"]) == {"static", "juliet_chain", "juliet_run", "oracle", "oracle_exits"}
    q = r["ratios"]
    ratio = q["juliet_run"]["inference"] / q["oracle"]["inference"]
    assert q["juliet_over_oracle"]["inference"] == pytest.approx(ratio)
    assert 0 < r["executed_macs"]["juliet_run"] < 1.1 * r["executed_macs"]["static"]
    assert r["latency"]["oracle"]["n"] == 3 and set(r["parts"]) == {"1", "8"}
    assert "juliet / oracle" in bench.format_bench(r)
