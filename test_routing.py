"""Routing claims: the compute knob, the exit table and its baselines, the collapse warning, the demo set.

No script and no optuna: trie.py, routers.py, losses.py, exits.py and data.py only.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import data
import exits
import recipes
from backbones import make_backbone
from conftest import grown_trie, routed_trie, varied_batch
from losses import exits_of, route_loss
from routers import (
    STOP_GO,
    ConfidenceSelector,
    Selector,
    TransformerSelector,
    confidence_features,
    decide,
    stops,
)
from trie import STOP, JulietNet


def loader_of(x, y, batch=16):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


@pytest.fixture(scope="module")
def routed(r18):
    """A trie whose selectors spread traffic over siblings and stops (conftest.routed_trie), built once."""
    return routed_trie(r18)


@pytest.fixture(scope="module")
def table(routed):
    """Its exit table on 64 varied images with random labels."""
    gen = torch.Generator().manual_seed(3)
    x, y = varied_batch(64, gen), torch.randint(0, 10, (64,), generator=gen)
    return exits.exit_table(routed, loader_of(x, y), "cpu", quiet=True)


def test_stop_threshold_zero_stops_everyone_at_the_first_exit_and_one_stops_nobody(routed):
    net = routed
    x = varied_batch(24, torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, first = net(x, return_paths=True, stop_threshold=0.0)
        _, never = net(x, return_paths=True, stop_threshold=1.0)
        _, top1 = net(x, return_paths=True)
    assert set(first) == {f"0/{STOP}"}
    assert not any(p.endswith(STOP) for p in never)
    assert all(net.node(p).depth == len(net.path(p)) - 1 for p in never)  # stage leaves: every stage of the path
    assert len(set(top1)) > 1  # the paper's argmax routes this trie's samples apart


def test_the_knob_in_the_forward_pass_equals_the_exit_table(routed):
    """One pass with nobody stopping scores every threshold; the forward pass with that threshold agrees."""
    net = routed
    gen = torch.Generator().manual_seed(7)
    x, y = varied_batch(48, gen), torch.randint(0, 10, (48,), generator=gen)
    table = exits.exit_table(net, loader_of(x, y), "cpu", quiet=True)
    for t in (None, 0.0, 0.3, 0.5, 0.7, 1.0):
        depth = exits.juliet_exits(table, t)
        with torch.no_grad():
            logits, paths = net(x, return_paths=True, stop_threshold=t)
        assert exits.leaf_ids(table, depth) == paths, t
        want = 100 * float((logits.argmax(-1) == y).float().mean())
        assert abs(exits.score(table, depth)["top1"] - want) < 1e-3, t


def test_curves_are_monotone_in_macs_and_span_the_exits(r18, table):
    curve = exits.juliet_curve(table)
    macs = [p["macs"] for p in curve]
    assert macs == sorted(macs) and macs[-1] > 3 * macs[0]  # t: 0 -> everyone at the stem, 1 -> full depth
    conf = [p["macs"] for p in exits.confidence_curve(table)]
    assert conf == sorted(conf)
    fixed = exits.fixed_depth_points(table)
    assert [p["depth"] for p in fixed] == list(range(len(r18.stages)))
    hull = exits.upper_hull(fixed)
    for p in fixed:  # every fixed exit lies on or under its hull, which is flat beyond its best point
        assert exits.hull_top1(fixed, p["macs"]) >= p["top1"] - 1e-9
    assert exits.hull_top1(fixed, 1e12) == max(p["top1"] for p in fixed)
    assert exits.hull_top1(fixed, fixed[0]["macs"] / 2) is None
    assert {hull[0]["depth"], hull[-1]["depth"]} <= {p["depth"] for p in fixed}
    rep = exits.curve_report(table, {"macs": 37.2e6, "top1": 50.0})
    assert rep["macs_span"] > 3 and len(rep["matched"]) == len(curve)
    assert all(r["fixed_hull_top1"] is not None and r["confidence_top1"] is not None for r in rep["matched"])


def test_budget_calibration_picks_the_largest_threshold_within_budget(table):
    lo, hi = (exits.score(table, exits.juliet_exits(table, t))["macs"] for t in (0.0, 1.0))
    budget = (lo + hi) / 2
    t = exits.threshold_for_budget(table, budget)
    assert exits.score(table, exits.juliet_exits(table, t))["macs"] <= budget
    assert exits.score(table, exits.juliet_exits(table, min(1.0, t + 0.01)))["macs"] > budget
    try:
        exits.threshold_for_budget(table, lo / 2)
        raise AssertionError("a budget below the cheapest exit must be refused")
    except ValueError as e:
        assert "below the cheapest exit" in str(e)


def test_collapse_warning_fires_on_a_collapsed_trie_only(r18, routed):
    x = varied_batch(32, torch.Generator().manual_seed(9))
    collapsed = grown_trie(r18).eval()
    with torch.no_grad():
        collapsed.root.selector.stop_bias.fill_(50.0)  # everyone stops at the stem
        _, paths = collapsed(x, return_paths=True)
    counts = {p: paths.count(p) for p in set(paths)}
    message = exits.collapse_message(counts, len(collapsed.leaves()))
    assert message is not None and f"0/{STOP}" in message and "100.0%" in message
    with torch.no_grad():
        _, paths = routed(x, return_paths=True)
    assert exits.collapse_message({p: paths.count(p) for p in set(paths)}, len(routed.leaves())) is None
    chain = JulietNet(r18, stop=False)  # one leaf: nothing to collapse
    assert exits.collapse_message({"0/0/0/0/0": 32}, len(chain.leaves())) is None


def test_report_gives_every_exit_per_group_and_the_depth_of_each_group(r18, table):
    table = dict(table, group=["easy" if i % 2 else "hard" for i in range(64)])
    rep = exits.report(table)
    assert len(rep["test_exits_all_samples"]) == len(r18.stages)
    for g in ("easy", "hard"):
        grp = rep["test_groups"][g]
        assert grp["samples"] == 32 and 0 <= grp["mean_depth"] <= len(r18.stages) - 1
        assert len(grp["exits_top1"]) == len(r18.stages) and sum(grp["leaves"].values()) == 32
    easy, hard = rep["test_groups"]["easy"]["exits_top1"], rep["test_groups"]["hard"]["exits_top1"]
    for d, p in enumerate(rep["test_exits_all_samples"]):  # the two halves average to the whole
        assert abs(p["top1"] - (easy[d] + hard[d]) / 2) < 1e-6


def test_demo_set_labels_groups_and_honours_its_parameters():
    """Easy samples carry their class's colour (the mean colour names the class by nearest class
    mean); hard ones do not. hard_fraction, size and seed do what they say."""
    a = data.SyntheticImages(1000, seed=1)
    y, hard = torch.tensor(a.targets), a.hard
    assert a.group == ["hard" if h else "easy" for h in hard.tolist()]
    assert 0.4 < float(hard.float().mean()) < 0.6  # hard_fraction 0.5
    rgb = torch.as_tensor(a.data).float().mean((1, 2))  # (n, 3) each image's mean colour
    means = torch.stack([rgb[~hard & (y == c)].mean(0) for c in range(10)])  # (10, 3)
    guess = torch.cdist(rgb, means).argmin(1)
    easy_acc, hard_acc = [float((guess == y)[m].float().mean()) for m in (~hard, hard)]
    assert easy_acc > 0.9 and hard_acc < 0.4, (easy_acc, hard_acc)
    assert not data.SyntheticImages(200, seed=1, hard_fraction=0.0).hard.any()
    small = data.SyntheticImages(20, seed=1, size=16)
    assert small.data.shape == (20, 16, 16, 3)
    same, other = data.SyntheticImages(20, seed=1), data.SyntheticImages(20, seed=2)
    assert (same.data == data.SyntheticImages(20, seed=1).data).all()
    assert not (same.data == other.data).all()


def test_exit_confidence_starts_as_the_papers_selector_and_learns_from_route_loss(r18):
    """The stop logit's read of the exit's confidence is zero at initialisation (the paper's selector), its
    features are what they claim, and route_loss trains it."""
    sure, unsure = torch.tensor([[20.0, 0, 0, 0]]), torch.zeros(1, 4)
    assert torch.allclose(confidence_features(sure), torch.tensor([[1.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(confidence_features(unsure), torch.tensor([[0.25, 0.0, 1.0]]), atol=1e-6)
    net = grown_trie(r18)
    assert net.options["exit_confidence"]  # on by default
    sel, gen = net.root.selector, torch.Generator().manual_seed(0)
    f, sig = torch.randn(6, 64, 8, 8, generator=gen), net.signatures(net.root)
    exit_logits = 5 * torch.randn(6, 10, generator=gen)
    with torch.no_grad():
        assert torch.equal(sel(f, sig, True, exit_logits), sel(f, sig, True))
        sel.confidence.weight.copy_(torch.tensor([[2.0, 0.0, 0.0]]))
        moved = sel(f, sig, True, exit_logits) - sel(f, sig, True)  # (B, K): only the stop logit moves
        assert torch.equal(moved[:, :-1], torch.zeros(6, moved.shape[1] - 1))
        assert torch.allclose(moved[:, -1], 2 * exit_logits.softmax(-1).max(-1).values)
    net.zero_grad()
    x, y = varied_batch(16, gen), torch.randint(0, 10, (16,), generator=gen)
    net.train()
    logits, record = net(x, return_record=True)
    route_loss(net, record, logits, y).backward()
    assert all(n.selector.confidence.weight.grad.abs().sum() > 0 for n in (r.node for r in exits_of(record)))
    paper = JulietNet(r18, exit_confidence=False, stop_go="selector")
    assert paper.root.selector is None or paper.root.selector.confidence is None
    assert grown_trie(r18, exit_confidence=False).root.selector.confidence is None


def test_stop_rule_half_is_the_knob_at_one_half_and_argmax_the_papers_top1(routed):
    """"half" stops where P_stop >= 1/2; "argmax" (Alg. 1) where P_stop beats every stage child alone, which
    with siblings stops samples whose likelier decision is to go on."""
    net = routed
    gen = torch.Generator().manual_seed(11)
    x, y = varied_batch(64, gen), torch.randint(0, 10, (64,), generator=gen)
    table = exits.exit_table(net, loader_of(x, y), "cpu", quiet=True)
    p_stop, p_stage = table["p_stop"][:, 0], table["p_stage"][:, 0]  # the root's decision
    assert len(net.root.stage_branches) > 1 and net.options["stop_rule"] == "half"
    with torch.no_grad():
        _, half = net(x, return_paths=True)
        _, at_half = net(x, return_paths=True, stop_threshold=0.5)
        net.options["stop_rule"] = "argmax"
        try:
            _, flat = net(x, return_paths=True)
        finally:
            net.options["stop_rule"] = "half"
    assert half == at_half
    assert [p == f"0/{STOP}" for p in half] == (p_stop >= 0.5).tolist()
    assert [p == f"0/{STOP}" for p in flat] == (p_stop > p_stage).tolist()
    assert sum(p == f"0/{STOP}" for p in flat) > sum(p == f"0/{STOP}" for p in half)


def test_the_inference_decision_is_the_choice_that_training_would_run():
    """Outside full-depth training the branch that runs is the decision (top-1), and it is Alg. 1's rule: the
    argmax over every branch without a threshold, else stop where P_stop >= t and the best stage branch where not."""
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(256, 3, generator=gen)
    for has_stop in (True, False):
        for t in (None, 0.0, 0.3, 0.5, 1.0):
            c = decide(logits, has_stop, t)
            if not has_stop or t is None:
                want = logits.argmax(-1)
            else:
                stop = stops(logits.softmax(-1)[:, -1], None, t)
                want = torch.where(stop, logits.shape[1] - 1, logits[:, :-1].argmax(-1))
            assert torch.equal(c.run, c.top1) and torch.equal(c.run, want), (has_stop, t)
            assert torch.equal(c.P, logits.softmax(-1))


def test_a_stop_or_go_node_decides_on_its_exits_confidence_and_a_grown_one_by_its_selector(r18):
    """stop_go="confidence" (ours): a node that only chooses between stopping and its one stage branch
    has P_stop = sigmoid(b + w . confidence features of its exit), no transformer; a node with siblings
    gets the selector, which takes over the stop logit's parameters; pruned back, the reverse."""
    torch.manual_seed(0)
    net = JulietNet(r18).eval()
    assert {type(n.selector).__name__ for n in net.nodes() if n.selector} == {"ConfidenceSelector"}
    with torch.no_grad():
        net.root.selector.stop_bias.fill_(0.3)
        net.root.selector.confidence.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
        f, exit_logits = torch.randn(5, 64, 8, 8), torch.randn(5, 10)
        P = net.root.selector(f, net.signatures(net.root), True, exit_logits).softmax(-1)
    want = torch.sigmoid(0.3 + confidence_features(exit_logits) @ torch.tensor([2.0, -1.0, 0.5]))
    assert torch.allclose(P[:, -1], want, atol=1e-6)
    net.add_child(net.root)  # a sibling: the root now chooses among stage branches
    assert isinstance(net.root.selector, TransformerSelector)
    assert net.root.selector.stop_bias.item() == pytest.approx(0.3)
    assert torch.equal(net.root.selector.confidence.weight, torch.tensor([[2.0, -1.0, 0.5]]))
    rebuilt = JulietNet.from_structure(net.structure(), make_backbone("resnet18"))
    rebuilt.load_state_dict(net.state_dict())  # the selectors' kinds follow from the structure
    net.remove_child(net.root, net.node("0/1"))
    assert isinstance(net.root.selector, ConfidenceSelector) and net.root.selector.stop_bias == 0.3
    paper = recipes.defaults(recipe="paper")["stop_go"]
    assert isinstance(JulietNet(r18, stop_go=paper).root.selector, TransformerSelector)


def test_the_confidence_rule_is_the_generic_selector_arithmetic_on_go_and_stop_logits():
    """ConfidenceSelector.forward computes, in one pass, what Selector.forward computes from the logits
    [0, 0] (go on, stop): the stop offset and confidence read, then the calibration with the previous exit."""
    torch.manual_seed(0)
    sel = ConfidenceSelector(64, 0)
    with torch.no_grad():
        sel.confidence.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
        sel.confidence.bias.fill_(-0.3)
        sel.stop_bias.fill_(0.2)
    f, exit_logits, prev = torch.randn(6, 64, 8, 8), 3 * torch.randn(6, 10), 3 * torch.randn(6, 10)
    generic = lambda *a: Selector.forward(sel, *a)  # noqa: E731
    sel.logits = lambda f, sig, stop: f.new_zeros(len(f), 2)  # the generic path's stage and stop logits
    for calibration in (None, torch.tensor([1.1, 0.1, 0.2, 0.3, 0.4, 0.5, -0.1])):
        if calibration is not None:
            sel.set_calibration(calibration)
        for p in (None, prev):
            torch.testing.assert_close(ConfidenceSelector.forward(sel, f, None, True, exit_logits, p),
                                       generic(f, None, True, exit_logits, p), rtol=0, atol=1e-6)


def test_a_one_class_trie_trains_and_infers_with_either_stop_decision():
    """One class (the data loader warns, and training goes on): the confidence features of a
    one-logit exit are defined (max softmax 1, margin 0, entropy 0), so every stop decision runs."""
    torch.manual_seed(0)
    x = varied_batch(8, torch.Generator().manual_seed(3))
    for stop_go in STOP_GO:
        net = JulietNet(make_backbone("resnet18", num_classes=1), selector="mlp", stop_go=stop_go)
        logits, record = net.train()(x, return_record=True)
        assert logits.shape == (8, 1) and all(torch.isfinite(r.P).all() for r in record.routed)
        with torch.no_grad():
            assert net.eval()(x).shape == (8, 1)
