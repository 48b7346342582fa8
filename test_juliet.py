"""The model's proofs: backbones, selectors, batched routing (Alg. 1), growth and pruning (Alg. 2-3), structure.

Equivalence tests in the micrograd/minGPT manner: a chain trie equals its backbone, batched routing
equals each sample run alone, pruning an unused branch leaves logits unchanged, save/load after growth is
exact, and trie.py + routers.py (+ grow_prune.py) copied alone build, train, save and rebuild a trie. Nothing here imports a
script or optuna; the repository's own checks (imports, file sizes, profile.py) are in test_repo.py.
"""

import copy
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from backbones import BACKBONES, make_backbone, static_model
from conftest import REPO, grown_trie, routed_trie, train_step, varied_batch
from grow_prune import GrowPruneConfig, end_epoch, grow, prune_sweep, sync_optimizer
from losses import balance_loss, exit_loss, exits_of, expected_cost_loss, juliet_loss, route_loss
from measure import node_visits
from routers import SELECTORS, decide
from trie import JulietNet

# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_chain_trie_equals_its_backbone(name):
    """Without stop children a prebuilt chain is the backbone, cut into nodes: same weights, same logits."""
    torch.manual_seed(0)
    static = static_model(name).eval()
    net = JulietNet(make_backbone(name), stop=False, init_from=static).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), static(x), rtol=0, atol=1e-5)
    assert [n.node_id for n in net.nodes()] == ["0", "0/0", "0/0/0", "0/0/0/0", "0/0/0/0/0"]


@pytest.mark.parametrize("name", ["efficientnet_b0", "densenet121", "resnet101"])
def test_a_grown_trie_trains_and_grows_on_every_backbone(name):
    """Siblings at two depths, our full training loss and Alg. 2 at threshold 0, on the backbones
    other than ResNet-18 (which the rest of this file uses)."""
    net = grown_trie(make_backbone(name), selector="mlp", prebuild=None if name != "resnet101" else 4)
    x, y = varied_batch(8, torch.Generator().manual_seed(0)), torch.arange(8) % 10
    logits, record = net(x, return_record=True)
    juliet_loss(net, record, logits, y).backward()
    grads = [p.grad for n in net.nodes() for p in n.sub.parameters() if p.grad is not None]
    assert logits.shape == (8, 10) and all(g.isfinite().all() for g in grads)
    assert all(p.grad is not None for p in net.root.sub.parameters())
    before = len(list(net.nodes()))
    cfg = GrowPruneConfig(grow_prune="both", theta_grow=0.0, grow_statistic="sigma2")
    assert grow(net, cfg, 10, record.leaf_counts) and len(list(net.nodes())) > before


def test_resnet101_prebuilds_a_chain_of_10_nodes():
    bb = make_backbone("resnet101")
    assert len(bb.stages) == 10
    net = JulietNet(bb, prebuild=10, stop=False)
    assert sum(1 for _ in net.nodes()) == 10
    assert max(n.depth for n in net.nodes()) == 9


# ----------------------------------------------------------------------------- routing (Algorithm 1)


@pytest.mark.parametrize("selector,min_paths", [("mlp", 4), ("transformer", 2)])
def test_batched_routing_equals_each_sample_alone(r18, selector, min_paths):
    net = routed_trie(r18, selector, steps=50 if selector == "transformer" else 20)
    x = varied_batch(32, torch.Generator().manual_seed(123))
    calls = {}
    for node in net.nodes():
        node.sub.register_forward_hook(lambda m, i, o, nid=node.node_id: calls.setdefault(nid, []).append(len(i[0])))
    with torch.no_grad():
        logits, paths = net(x, return_paths=True)
        assert len(set(paths)) >= min_paths, "the trie must really send samples down different children"
        # each node's sub-module ran once, on exactly the samples routed to it
        assert all(len(v) == 1 for v in calls.values()), calls
        for node in net.nodes():
            if node.branches and node.node_id in calls:
                assert sum(calls.get(k.node_id, [0])[0] for k in node.branches.values()) == calls[node.node_id][0]
        for i in range(len(x)):  # alone through the batched code, and through Alg. 1's plain recursion
            single, path = net(x[i:i + 1], return_paths=True)
            assert path == [paths[i]] == [forward_pass(net, x[i:i + 1], net.root, 0.5)[1]]  # stop_rule "half"
            torch.testing.assert_close(single[0], logits[i], rtol=0, atol=1e-5)


def forward_pass(net, x, node, t, prev=None):
    """Alg. 1 for one sample x (1, C, H, W), as the paper writes it: a plain recursion, no batching.
    Returns (logits, leaf id). `t`: the stop threshold (None: Alg. 1's argmax); `prev`: the last
    exit read on the path (what a calibrated selector reads)."""
    f = node.sub(x)                                                        # line 2
    if not node.branches:                                                  # line 3: a leaf
        return net.exit(f), node.node_id
    kids = list(node.branches.values())
    if len(kids) == 1:                                                     # nothing to choose
        return forward_pass(net, f, kids[0], t, prev)
    read = net.exit(f) if net.reads_exit(node) else None                   # our exit's confidence
    logits = node.selector(f, net.signatures(node), node.has_stop, read, prev)
    P = logits.softmax(-1)[0]                                              # line 4, Eq. 1
    if node.has_stop and t is not None:                                    # our stop rule
        i = len(kids) - 1 if t < 1 and P[-1] >= t else int(P[:-1].argmax())
    else:
        i = int(P.argmax())                                                # line 5
    return forward_pass(net, f, kids[i], t, prev if read is None else read)  # line 7 (6: alpha)


@pytest.mark.parametrize("t", [1.0, "operating point", "argmax"])
def test_batched_routing_equals_the_per_sample_reference(r18, t):
    """The batched forward pass is Alg. 1: on a grown trie (sibling stages at two depths, stop
    branches, one calibrated selector) every sample reaches the leaf the plain recursion reaches,
    with the same logits, at full depth, at an operating point and under the paper's argmax."""
    net = routed_trie(r18, "transformer", seed=1, steps=50)
    assert len(net.root.stage_branches) == 2 and len(net.node("0/0").stage_branches) == 2
    assert all(n.has_stop for n in net.nodes() if n.branches)
    net.node("0/0").selector.set_calibration(torch.tensor([1.2, 0.5, -0.3, 0.2, 0.4, 0.1, 0.3]))
    if t == "operating point":
        net.set_operating_point(0.45)
    if t == "argmax":
        net.options["stop_rule"] = "argmax"
    x = varied_batch(48, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, paths = net(x, return_paths=True, stop_threshold=1.0 if t == 1.0 else None)
        rule = {1.0: 1.0, "operating point": 0.45, "argmax": None}[t]
        ref = [forward_pass(net, x[i:i + 1], net.root, rule) for i in range(len(x))]
    assert paths == [leaf for _, leaf in ref]
    torch.testing.assert_close(logits, torch.cat([lg for lg, _ in ref]), rtol=1e-4, atol=1e-4)
    assert len(set(paths)) >= 3  # the samples do take different paths


@pytest.mark.parametrize("policy", ["top1", "gumbel"])
@pytest.mark.parametrize("selector", list(SELECTORS))
def test_selectors_get_gradient_through_the_top1_choice(r18, selector, policy):
    """The paper's routed training: the task loss alone reaches every selector that routed samples."""
    net = grown_trie(r18, selector=selector, policy=policy, train_depth="routed").train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    logits, record = net(x, return_record=True)
    F.cross_entropy(logits, y).backward()
    visits = node_visits(net, record.ran_leaf_counts)
    routed = [n for n in net.nodes() if len(n.branches) > 1 and visits[n.node_id]]
    assert net.root in routed
    for node in routed:
        grads = [p.grad for p in node.selector.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), node.node_id


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_full_depth_training_teaches_siblings_by_the_task_and_stops_by_route_loss(r18, selector):
    """Full-depth training: the sibling choice learns from the task loss (straight-through), the stop
    decision of every node that has an exit from route_loss, and every sample runs to a stage leaf."""
    net = grown_trie(r18, selector=selector).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    logits, record = net(x, return_record=True)
    assert all(not net.node(leaf).is_stop for leaf in record.ran_leaf_counts)
    assert sum(record.ran_leaf_counts.values()) == 16 == sum(record.leaf_counts.values())
    F.cross_entropy(logits, y).backward(retain_graph=True)
    sibling_grad = [p.grad for p in net.root.selector.parameters()]  # the root chooses between 0/0 and 0/1
    assert any(g is not None and g.abs().sum() > 0 for g in sibling_grad)
    net.zero_grad()
    route_loss(net, record, logits, y).backward()
    for r in exits_of(record):
        node = r.node
        grads = [p.grad for p in node.selector.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), node.node_id


def test_straight_through_gate_is_exactly_one_in_the_forward_pass(r18):
    """Routing changes which modules run, never the values: the trie's logits equal a hand-run path."""
    net = routed_trie(r18)
    x = varied_batch(8, torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits, paths = net(x, return_paths=True)
        i = next(i for i, p in enumerate(paths) if net.node(p).depth > 0)  # a sample that went past the stem
        chain = net.path(paths[i])
        assert chain[0] is net.root
        h = x[i:i + 1]
        for node in chain:
            h = node.sub(h)
        torch.testing.assert_close(net.head(net.adapt(h.mean((2, 3))))[0], logits[i], rtol=0, atol=1e-5)


def test_gumbel_policy_samples_in_training_and_is_top1_at_eval(r18):
    """§5.3's Gumbel policy: in training a hard Gumbel-softmax sample (it differs from the argmax
    on some rows, and between two draws), at eval the plain top-1 of Alg. 1."""
    logits = torch.randn(512, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a, b = decide(logits, False, None, gumbel_tau=1.0), decide(logits, False, None, gumbel_tau=1.0)
    assert (a.run != logits.argmax(-1)).any() and (a.run != b.run).any()
    assert torch.equal(decide(logits, False, None).run, logits.argmax(-1))
    net = grown_trie(r18, policy="gumbel")
    net.tau = 1.0
    calls = []  # the Gumbel temperature of each decision (decide's 4th argument)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("trie.decide", lambda *a, **k: calls.append(a[3:]) or decide(*a, **k))
        net.train()(torch.randn(8, 3, 32, 32))
        assert calls and all(c[0] == 1.0 for c in calls)  # training samples at tau
        calls.clear()
        ref = copy.deepcopy(net)
        ref.options["policy"] = "top1"
        x = torch.randn(16, 3, 32, 32)
        with torch.no_grad():
            assert net.eval()(x, return_paths=True)[1] == ref.eval()(x, return_paths=True)[1]
        assert calls and all(c[0] is None for c in calls)  # eval: no Gumbel noise at all


def test_statistics_update_in_training_only_and_sigma2_in_unit_interval(r18):
    net = grown_trie(r18, usage_beta=0.5)  # alpha's own EMA decay (train_cifar's --usage-horizon)
    x = torch.randn(16, 3, 32, 32)
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        net.eval()(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for n in net.nodes():
        n.alpha.zero_()  # so that every branch's alpha moves by exactly (1 - beta) x its share
    alpha0 = {n.node_id: float(n.alpha) for n in net.nodes()}
    net.train()(x)
    sig = torch.stack([n.sigma2 for n in net.nodes()])
    assert (sig >= 0).all() and (sig <= 1).all() and (sig > 0).any()
    # Alg. 1 line 6 on a batch: at the root, whose decision every sample takes, each branch's alpha
    # moves toward its share of the samples, and the shares sum to one
    beta = net.options["usage_beta"]
    kids = list(net.root.branches.values())
    new, old = [float(k.alpha) for k in kids], [alpha0[k.node_id] for k in kids]
    shares = [(a - beta * b) / (1 - beta) for a, b in zip(new, old)]
    assert abs(sum(shares) - 1) < 1e-4 and min(shares) >= -1e-6
    assert all(abs(16 * s - round(16 * s)) < 1e-4 for s in shares)  # whole samples of 16


def test_lone_sample_in_training_mode(r18):
    """Routing makes 1-sample sub-batches; BatchNorm must not fail on them (1x1 maps in layer4)."""
    net = JulietNet(r18, stop=False).train()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_auxiliary_losses(r18):
    """balance_loss is §2.2's M sum_m (f_m - 1/M)^2 over sibling stage branches, and
    expected_cost_loss the expected stage MACs under P over the backbone's, both by hand."""
    net = grown_trie(r18).train()
    x = torch.randn(16, 3, 32, 32)
    _, record = net(x, return_record=True)
    cost, balance = expected_cost_loss(net, record), balance_loss(record)
    macs = r18.stage_macs((32, 32))
    want_cost, want_balance = macs[0] * 16, []
    for r in record.routed:
        kids = list(r.node.branches.values())
        want_cost += sum(float(r.P[:, j].sum()) * macs[k.depth] for j, k in enumerate(kids)
                         if not k.is_stop)
        M = len(r.node.stage_branches)
        if M > 1:
            f = [float((r.P[:, m] / r.P[:, :M].sum(1)).mean()) for m in range(M)]
            want_balance.append(M * sum((fm - 1 / M) ** 2 for fm in f))
    assert float(cost) == pytest.approx(want_cost / (16 * sum(macs)), rel=1e-5)
    n = len(want_balance)  # the root and 0/0 have sibling stage branches
    assert n == 2 and float(balance) == pytest.approx(sum(want_balance) / n, rel=1e-4, abs=1e-7)
    (cost + balance).backward()
    assert net.root.selector.sig_proj[1].weight.grad.abs().sum() > 0


def test_juliet_loss_is_the_task_loss_plus_each_weighted_loss(r18):
    """The training objective, term by term with distinct weights (route_loss at the given lambda_c);
    a mutation run found that a flipped sign or a dropped cost_weight survived the per-loss tests."""
    net = grown_trie(r18).train()
    x, y = varied_batch(16, torch.Generator().manual_seed(3)), torch.arange(16) % 10
    logits, record = net(x, return_record=True)
    w = dict(exit_weight=0.7, route_weight=1.3, cost_weight=0.2, split_weight=0.0, balance_weight=0.4,
             expected_cost_weight=0.9)
    want = (F.cross_entropy(logits, y) + 0.7 * exit_loss(record, y)
            + 1.3 * route_loss(net, record, logits, y, cost_weight=0.2) + 0.4 * balance_loss(record)
            + 0.9 * expected_cost_loss(net, record))
    torch.testing.assert_close(juliet_loss(net, record, logits, y, **w), want)
    assert not torch.isclose(route_loss(net, record, logits, y, cost_weight=0.2),
                             route_loss(net, record, logits, y))  # the cost weight matters here


def test_exit_loss_trains_every_exit_on_every_sample_that_reached_it(r18):
    """exit_loss is the mean over exits of the cross-entropy of each exit on exactly the samples
    that reached its node (in full-depth training: every sample, at every routed node)."""
    net = grown_trie(r18, stage_grad=1.0).train()  # joint training: the exits' gradient reaches the stages
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    _, record = net(x, return_record=True)
    ex = exits_of(record)
    assert [r.node.node_id for r in ex] == [r.node.node_id for r in record.routed
                                           if r.node.has_stop]
    assert ex[0].node is net.root and torch.equal(ex[0].idx, torch.arange(16))
    reached = {}  # node id -> the samples that ran its sub-module, by hooks
    for n in net.nodes():
        n.sub.register_forward_hook(lambda m, i, o, nid=n.node_id: reached.update({nid: len(i[0])}))
    net(x, return_record=True)
    assert all(len(r.idx) == reached[r.node.node_id] for r in ex)
    want = torch.stack([F.cross_entropy(r.exit, y[r.idx]) for r in ex]).mean()
    loss = exit_loss(record, y)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert net.adapters["64"].weight.grad.abs().sum() > 0
    assert net.root.sub[0].weight.grad.abs().sum() > 0  # deep supervision reaches the stem


def test_route_loss_is_the_gain_of_stopping_under_the_current_policy(r18):
    """route_loss, checked against a per-sample reimplementation on a chain: stopping at depth d costs
    e_d + price C_d, going on is worth V_{d+1} (the same cost expected under the current P_stop further
    down), and the gradient in P_stop is -g+/P_stop + g-/(1 - P_stop) with g = V_{d+1} - (e_d + price C_d)."""
    torch.manual_seed(0)
    net = JulietNet(r18).train()  # a chain: stem + 4 stages, a stop child at every internal node
    x, y = varied_batch(12, torch.Generator().manual_seed(1)), torch.randint(0, 10, (12,))
    price = 0.3
    logits, record = net(x, return_record=True)
    for r in exits_of(record):
        r.P.retain_grad()
    route_loss(net, record, logits, y, cost_weight=price).backward()
    macs = net.backbone.stage_macs((32, 32))
    cost = [price * sum(macs[:d + 1]) / sum(macs) for d in range(len(macs))]
    with torch.no_grad():
        exits = sorted(exits_of(record), key=lambda e: e.node.depth)  # one per depth 0..3, every sample in each
        err = [(e.exit.argmax(-1) != y).float() for e in exits]
        p_stop = [e.P[:, -1] for e in exits]
        for n in range(len(y)):
            V = float(logits[n].argmax() != y[n]) + cost[-1]
            for d in reversed(range(len(exits))):
                here = float(err[d][n]) + cost[d]
                g, p = V - here, float(p_stop[d][n])
                want = (-max(g, 0) / p + max(-g, 0) / (1 - p)) / len(y)
                torch.testing.assert_close(float(exits[d].P.grad[n, -1]), want, rtol=1e-4, atol=1e-6)
                V = p * here + (1 - p) * V


# ----------------------------------------------------------------------------- growth and pruning


def test_growth_fires_above_theta_grow_only(r18):
    torch.manual_seed(0)
    net = JulietNet(r18, prebuild=2, stop=False)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="sigma2", theta_grow=0.4, grow_every=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    net.train()
    _, record = net(x, return_record=True)
    leaf = net.node("0/0")
    assert record.leaf_counts == {"0/0": 8}
    leaf.sigma2.fill_(0.39)
    assert grow(net, cfg, 1, record.leaf_counts, opt) == []
    leaf.sigma2.fill_(0.41)
    events = grow(net, cfg, 2, record.leaf_counts, opt)
    assert [(e["kind"], e["node"], e["statistic"], e["threshold"]) for e in events] == \
        [("grow", "0/0/0", "sigma2", 0.4)]
    new = net.node("0/0/0")
    assert float(new.alpha) == 0.0
    w0 = [p.detach().clone() for p in new.parameters()]
    train_step(net, opt, x, y)  # the new child is the only route on: it must learn from this step
    assert any(not torch.equal(a, b) for a, b in zip(w0, new.parameters()))
    assert grow(net, GrowPruneConfig(grow_prune="prune-only", grow_every=1), 3, {"0/0/0": 8}, opt) == []  # mode gates


def test_growth_respects_m_max_and_max_depth(r18):
    torch.manual_seed(0)
    net = JulietNet(r18, prebuild=2)
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="sigma2", theta_grow=0.0, grow_every=1, m_max=2,
                          max_depth=2)
    net.train()
    events = []
    for step in range(1, 12):
        for n in net.nodes():
            n.sigma2.fill_(1.0)
        events += grow(net, cfg, step, {"0/0": 8})
    assert [e["node"] for e in events] == ["0/0/0", "0/0/1"]  # M_max = 2 stage children
    counts = {"0/0/0": 8}  # depth 2 is max_depth: it grows a sibling, but 0/0 is full
    assert grow(net, cfg, 12, counts) == []
    counts = {"0/stop": 8}  # a stop leaf grows at its parent
    assert [e["node"] for e in grow(net, cfg, 13, counts)] == ["0/1"]
    net.node("0/1").sigma2.fill_(1.0)
    counts = {"0/1": 8}  # 0/1 can deepen
    assert [e["node"] for e in grow(net, cfg, 14, counts)] == ["0/1/0"]
    net.node("0/1/0").sigma2.fill_(1.0)
    counts = {"0/1/0": 8}  # at max_depth: a sibling of its own stage
    assert [e["node"] for e in grow(net, cfg, 15, counts)] == ["0/1/1"]
    assert net.node("0/1/1").depth == 2


def test_a_grown_sibling_is_a_fresh_stage(r18):
    torch.manual_seed(0)
    net = JulietNet(r18, prebuild=2)
    net.root.sigma2.fill_(1.0)
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="sigma2", theta_grow=0.0, grow_every=1)
    assert [e["node"] for e in grow(net, cfg, 1, {"0/stop": 8})] == ["0/1"]  # at the root, beside 0/0
    w1, w0 = (net.node(k).sub.get_submodule(r18.stages[1].sig_name).weight.detach() for k in ("0/1", "0/0"))
    assert abs(float(torch.nn.functional.cosine_similarity(w1.flatten(), w0.flatten(), 0))) < 0.2
    assert float(net.node("0/1").alpha) == 0.0 and not net.node("0/1").branches  # Alg. 2 line 3: alpha = 0


def test_pruning_after_t_min_low_epochs_never_root_or_stop(r18):
    torch.manual_seed(0)
    net = grown_trie(r18)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(net, opt, x, y)  # creates Adam state for the params that got gradient
    cfg = GrowPruneConfig(grow_prune="both", theta_prune=0.1, t_min=2, prune_every=1)
    for node in net.nodes():
        node.alpha.fill_(0.5)
    net.node("0/1").alpha.fill_(0.05)
    net.node("0/stop").alpha.fill_(0.0)
    doomed = set(net.node("0/1").parameters())
    assert end_epoch(net, cfg, epoch=1, step=10, optimizer=opt) == []  # 1 low epoch < t_min
    events = end_epoch(net, cfg, epoch=2, step=20, optimizer=opt)
    assert [(e["kind"], e["node"], e["statistic"]) for e in events] == [("prune", "0/1", "alpha")]
    ids = {n.node_id for n in net.nodes()}
    assert "0/1" not in ids and "0/1/0" not in ids and "0/stop" in ids and "0" in ids
    assert not doomed & set(opt.param_groups[0]["params"]) and not doomed & set(opt.state)
    train_step(net, opt, x, y)
    # the root has no alpha of its own to fall below, and where every stage child is idle the samples chose our
    # stop child: a whole sweep with everything idle keeps every node
    for node in net.nodes():
        node.alpha.zero_()
        node.low_epochs.fill_(5)
    assert prune_sweep(net, cfg, step=30, optimizer=opt) == [] and {n.node_id for n in net.nodes()} == ids
    net.node("0/0/0").low_epochs.zero_()  # ... until a sibling takes the traffic: then the idle one goes
    assert [e["node"] for e in prune_sweep(net, cfg, step=31, optimizer=opt)] == ["0/0/1"]
    train_step(net, opt, x, y)


def test_pruning_an_unused_branch_leaves_logits_unchanged(r18):
    net = routed_trie(r18)
    # two paths can cover at most 6 of the fixture's 7 non-root stage nodes: one branch gets no traffic
    x = varied_batch(2, torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits, paths = net(x, return_paths=True)
    used = {p for path in paths for p in _prefixes(path)}
    unused = [n for n in net.nodes() if not n.is_stop and n is not net.root and n.node_id not in used]
    assert unused, "fixture should leave some branch without traffic"
    net.remove_child(net.parent(unused[0]), unused[0])
    with torch.no_grad():
        assert torch.equal(net(x), logits)


def _prefixes(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_save_load_of_grown_and_pruned_trie_is_bit_identical(r18):
    net = grown_trie(r18, selector="conv")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    train_step(net, opt, x, y)
    net.node("0/0/1").low_epochs.fill_(99)
    prune_sweep(net, GrowPruneConfig(t_min=1), step=1, optimizer=opt)
    net.add_child(net.root)  # 0/2: ids are never reused
    sync_optimizer(opt, net)
    train_step(net, opt, x, y)

    buf = io.BytesIO()
    torch.save({"structure": json.dumps(net.structure()), "model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    net2 = JulietNet.from_structure(json.loads(ckpt["structure"]), r18)
    net2.load_state_dict(ckpt["model"])
    assert [n.node_id for n in net2.nodes()] == [n.node_id for n in net.nodes()]
    assert "0/2" in {n.node_id for n in net2.nodes()} and "0/0/1" not in {n.node_id for n in net2.nodes()}
    net.eval(), net2.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    # the optimizer state lines up with the rebuilt net's parameters, so training resumes identically
    opt2 = torch.optim.Adam(net2.parameters(), 1e-3)
    opt2.load_state_dict(ckpt["opt"])
    train_step(net, opt, x, y), train_step(net2, opt2, x, y)
    net.eval(), net2.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))


def test_structure_is_json_and_self_describing(r18):
    s = grown_trie(r18).structure()
    s2 = json.loads(json.dumps(s))
    assert s2 == s and s["backbone"] == "resnet18" and s["options"]["selector"] == "transformer"
    assert [c["id"] for c in s["root"]["children"]] == ["0/0", "0/1", "0/stop"]


# ----------------------------------------------------------------------------- bad input and copying alone


def test_bad_names_list_the_valid_ones(r18):
    with pytest.raises(ValueError, match="resnet18.*densenet121"):
        make_backbone("vgg16")
    with pytest.raises(ValueError, match="transformer, mlp, conv"):
        JulietNet(r18, selector="lstm")
    with pytest.raises(ValueError, match="top1, gumbel"):
        JulietNet(r18, policy="sample")
    with pytest.raises(ValueError, match="both, grow-only, prune-only, off"):
        GrowPruneConfig(grow_prune="sometimes")
    assert set(BACKBONES) == {"resnet18", "resnet101", "densenet121", "efficientnet_b0"}


def test_bad_values_name_the_parameter(r18):
    net = JulietNet(r18)
    with pytest.raises(ValueError, match="in_channels=3"):
        net(torch.randn(2, 1, 32, 32))
    for name, bad in [("theta_grow", 1.5), ("theta_prune", -0.1), ("t_min", 0), ("m_max", 0)]:
        with pytest.raises(ValueError, match=name):
            GrowPruneConfig(**{name: bad})
    with pytest.raises(ValueError, match="prebuild"):
        JulietNet(r18, prebuild=6)
    with pytest.raises(ValueError, match="beta"):
        JulietNet(r18, ema_beta=1.0)


TINY_BACKBONE = '''
import types, torch, torch.nn as nn
from trie import JulietNet

def conv(i, o, s):
    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())

def build():
    return [conv(3, 8, 1), conv(8, 16, 2), conv(16, 32, 2)], nn.Linear(32, 4)

stages = [types.SimpleNamespace(make=(lambda i=i: build()[0][i]), channels=c, sig_name="0", sig_dim=c)
          for i, c in enumerate((8, 16, 32))]
backbone = types.SimpleNamespace(name="tiny", num_classes=4, stages=stages, head_width=32, in_channels=3,
                                 initial=lambda model=None: build())
'''


def test_trie_and_routers_alone_build_train_save_and_rebuild(tmp_path):
    """trie.py + routers.py (+ grow_prune.py, whose statistics the forward pass records) copied into an empty
    folder are a whole library: any backbone object will do."""
    for name in ("trie.py", "routers.py", "grow_prune.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    code = TINY_BACKBONE + '''
torch.manual_seed(0)
net = JulietNet(backbone, selector="transformer")
net.add_child(net.root)  # a second stage-1 specialist
opt = torch.optim.Adam(net.parameters(), 1e-3)
x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
loss = nn.functional.cross_entropy(net(x), y)
loss.backward()
opt.step()
torch.save({"structure": net.structure(), "model": net.state_dict()}, "ckpt.pt")
ckpt = torch.load("ckpt.pt", weights_only=True)
net2 = JulietNet.from_structure(ckpt["structure"], backbone)
net2.load_state_dict(ckpt["model"])
net.eval(), net2.eval()
with torch.no_grad():
    assert torch.equal(net(x), net2(x))
import sys
assert "backbones" not in sys.modules and all(m not in sys.modules for m in ("runs", "data", "measure"))
print("ok", sorted(n.node_id for n in net2.nodes()))
'''
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "'0/1'" in out.stdout


def test_signatures_follow_the_stage_branches_weights(r18):
    """§4.1's weight signature of each stage branch: the mean of its sig conv's weights, read afresh as they learn."""
    net = grown_trie(r18)
    s0 = net.signatures(net.root)
    train_step(net, torch.optim.SGD(net.parameters(), lr=0.5), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    s1 = net.signatures(net.root)
    name = r18.stages[1].sig_name
    want = torch.stack([k.sub.get_submodule(name).weight.detach().mean((1, 2, 3)) for k in net.root.stage_branches])
    assert torch.equal(s1, want) and not torch.equal(s0, want)


def test_the_readme_snippet_runs_on_the_five_model_files_copied_alone(tmp_path):
    """The README's usage snippet, run in an empty folder holding only trie.py, routers.py,
    grow_prune.py, losses.py and backbones.py: the library a user copies is whole."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf8").read()
    block = readme.split("<!-- usage snippet")[1].split("```python\n")[1].split("```")[0]
    for name in ("trie.py", "routers.py", "grow_prune.py", "losses.py", "backbones.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("['0/")  # the leaves reached: ids under the root
