"""Tests for Juliet. Run: make test  (or .venv/bin/python -m pytest -q test_juliet.py)

Equivalence tests in the micrograd/minGPT manner: a chain trie equals its backbone, batched routing
equals each sample run alone, pruning an unused branch leaves logits unchanged, save/load is exact.
"""

import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from backbones import BACKBONES, make_backbone, static_model
from grow_prune import GrowPruneConfig, end_epoch, grow, prune_sweep, sync_optimizer
from routers import SELECTORS
from trie import JulietNet

REPO = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def r18():
    return make_backbone("resnet18")


def grown_trie(backbone, router="transformer", seed=0, **kw):
    """A trie with siblings at depths 1 and 2, so that samples of one batch take different paths."""
    torch.manual_seed(seed)
    net = JulietNet(backbone, router=router, **kw)
    net.add_child(net.root)                  # 0/1: a second stage-1 specialist
    net.add_child(net.node("0/0"))           # 0/0/1
    net.add_child(net.node("0/1"))           # 0/1/0: 0/1 was a leaf; it gains a stop child too
    return net


def varied_batch(n, gen):
    """Images that differ in contrast and colour, so that routing has something to tell apart."""
    return (torch.randn(n, 3, 32, 32, generator=gen) * 3 * torch.rand(n, 1, 1, 1, generator=gen)
            + 2 * torch.randn(n, 3, 1, 1, generator=gen))


def routed_trie(backbone, router="mlp", seed=0, steps=20):
    # the transformer selector starts out less sensitive to its input than the MLP; give it 50 steps
    """A grown trie whose selectors were trained on the §2.2 balance loss alone, to spread traffic."""
    net = grown_trie(backbone, router=router, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for n in net.nodes() if n.selector for p in n.selector.parameters()], 3e-2)
    net.train()
    for _ in range(steps):
        net(varied_batch(32, gen))
        opt.zero_grad()
        net.balance_loss().backward()
        opt.step()
    return net.eval()


def train_step(net, opt, x, y):
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------- backbones


def test_static_baselines_match_paper_table4():
    """THOP at 1x3x32x32 (the paper's convention, MACs) reproduces Table 4's baselines."""
    import thop

    expected = {"resnet18": (37.22, 11.18), "densenet121": (59.11, 6.96)}
    for name, (macs_m, params_m) in expected.items():
        model = static_model(name, num_classes=10)
        macs, params = thop.profile(copy.deepcopy(model), inputs=(torch.randn(1, 3, 32, 32),), verbose=False)
        assert round(macs / 1e6, 2) == macs_m, name
        assert round(params / 1e6, 2) == params_m, name


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


def test_resnet101_prebuilds_a_chain_of_10_nodes():
    bb = make_backbone("resnet101")
    assert len(bb.stages) == 10
    net = JulietNet(bb, prebuild=10, stop=False)
    assert sum(1 for _ in net.nodes()) == 10
    assert max(n.depth for n in net.nodes()) == 9


# ----------------------------------------------------------------------------- routing (Algorithm 1)


@pytest.mark.parametrize("router,min_paths", [("mlp", 4), ("transformer", 2)])
def test_batched_routing_equals_each_sample_alone(r18, router, min_paths):
    net = routed_trie(r18, router, steps=50 if router == "transformer" else 20)
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
            if node.kids and node.node_id in calls:
                assert sum(calls.get(k.node_id, [0])[0] for k in node.kids) == calls[node.node_id][0]
        for i in range(len(x)):
            single, path = net(x[i:i + 1], return_paths=True)
            assert path == [paths[i]]
            torch.testing.assert_close(single[0], logits[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["top1", "gumbel"])
@pytest.mark.parametrize("router", list(SELECTORS))
def test_selectors_get_gradient_through_the_top1_choice(r18, router, policy):
    net = grown_trie(r18, router=router, policy=policy).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    F.cross_entropy(net(x), y).backward()
    routed = [n for n in net.nodes() if len(n.kids) > 1 and n.node_id in net.visits]
    assert net.root in routed
    for node in routed:
        grads = [p.grad for p in node.selector.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), node.node_id


def test_straight_through_gate_is_exactly_one_in_the_forward_pass(r18):
    """Routing changes which modules run, never the values: the trie's logits equal a hand-run path."""
    net = routed_trie(r18)
    x = varied_batch(8, torch.Generator().manual_seed(123))
    with torch.no_grad():
        logits, paths = net(x, return_paths=True)
        leaf = net.node(paths[0])
        assert leaf.depth > 0
        chain, node = [], leaf
        while node is not None:
            chain.insert(0, node)
            node = net.parent(node)
        h = x[:1]
        for node in chain:
            h = node.sub(h)
        pooled = h.mean((2, 3))
        key = str(pooled.shape[1])
        z = net.adapters[key](pooled) if key in net.adapters else pooled
        torch.testing.assert_close(net.head(z)[0], logits[0], rtol=0, atol=1e-5)


def test_gumbel_policy_is_top1_at_eval(r18):
    net = grown_trie(r18, policy="gumbel").eval()
    ref = copy.deepcopy(net)
    ref.options["policy"] = "top1"
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert net(x, return_paths=True)[1] == ref(x, return_paths=True)[1]


def test_statistics_update_in_training_only_and_sigma2_in_unit_interval(r18):
    net = grown_trie(r18)
    x = torch.randn(16, 3, 32, 32)
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        net.eval()(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    alpha0 = {n.node_id: float(n.alpha) for n in net.nodes()}
    net.train()(x)
    sig = torch.stack([n.sigma2 for n in net.nodes()])
    assert (sig >= 0).all() and (sig <= 1).all() and (sig > 0).any()
    # Alg. 1 line 6 on a batch: each child's alpha moves toward its share of the parent's samples
    beta = net.options["beta"]
    for node in net.nodes():
        if len(node.kids) > 1 and node.node_id in net.visits:
            new = [float(k.alpha) for k in node.kids]
            old = [alpha0[k.node_id] for k in node.kids]
            shares = [(a - beta * b) / (1 - beta) for a, b in zip(new, old)]
            assert abs(sum(shares) - 1) < 1e-4 and min(shares) >= -1e-6


def test_lone_sample_in_training_mode(r18):
    """Routing makes 1-sample sub-batches; BatchNorm must not fail on them (1x1 maps in layer4)."""
    net = JulietNet(r18, stop=False).train()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_auxiliary_losses(r18):
    net = grown_trie(r18).train()
    x = torch.randn(16, 3, 32, 32)
    net(x)
    cost, balance = net.cost_loss(), net.balance_loss()
    assert 0 < float(cost) <= 1 and float(balance) >= 0
    (cost + balance).backward()
    assert net.root.selector.sig_proj[1].weight.grad.abs().sum() > 0
    # a net that may stop at the stem costs less than the full backbone in expectation
    assert float(cost) < 1


# ----------------------------------------------------------------------------- growth and pruning


def test_growth_fires_above_theta_grow_only(r18):
    torch.manual_seed(0)
    net = JulietNet(r18, prebuild=2, stop=False)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    cfg = GrowPruneConfig(theta_grow=0.4, grow_every=1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(net, opt, x, y)
    leaf = net.node("0/0")
    assert net.last_leaf_counts == {"0/0": 8}
    leaf.sigma2.fill_(0.39)
    assert grow(net, cfg, step=1, optimizer=opt) == []
    leaf.sigma2.fill_(0.41)
    events = grow(net, cfg, step=2, optimizer=opt)
    assert [(e["kind"], e["node"], e["statistic"], e["threshold"]) for e in events] == \
        [("grow", "0/0/0", "sigma2", 0.4)]
    new = net.node("0/0/0")
    assert float(new.alpha) == 0.0
    w0 = [p.detach().clone() for p in new.parameters()]
    train_step(net, opt, x, y)  # the new child is the only route on: it must learn from this step
    assert any(not torch.equal(a, b) for a, b in zip(w0, new.parameters()))
    assert grow(net, GrowPruneConfig(mode="prune-only", grow_every=1), 3, opt) == []  # mode gates growth


def test_growth_respects_m_max_and_max_depth(r18):
    torch.manual_seed(0)
    net = JulietNet(r18, prebuild=2)
    cfg = GrowPruneConfig(theta_grow=0.0, grow_every=1, m_max=2, max_depth=2)
    net.train()
    events = []
    for step in range(1, 12):
        for n in net.nodes():
            n.sigma2.fill_(1.0)
        net.last_leaf_counts = {"0/0": 8}
        events += grow(net, cfg, step)
    assert [e["node"] for e in events] == ["0/0/0", "0/0/1"]  # M_max = 2 stage children
    net.last_leaf_counts = {"0/0/0": 8}
    assert grow(net, cfg, 12) == []  # depth 2 is max_depth
    net.last_leaf_counts = {"0/stop": 8}  # a stop leaf grows at its parent
    assert [e["node"] for e in grow(net, cfg, 13)] == ["0/1"]


def test_pruning_after_t_min_low_epochs_never_root_or_stop(r18):
    torch.manual_seed(0)
    net = grown_trie(r18)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(net, opt, x, y)  # creates Adam state for the params that got gradient
    cfg = GrowPruneConfig(theta_prune=0.1, t_min=2, prune_every=1)
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
    # the root has no alpha of its own to fall below; a whole sweep with everything idle keeps it
    for node in net.nodes():
        node.alpha.zero_()
        node.low_epochs.fill_(5)
    prune_sweep(net, cfg, step=30, optimizer=opt)
    assert [n.node_id for n in net.nodes()] == ["0"]
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
    net = grown_trie(r18, router="conv")
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
    net2 = JulietNet.from_structure(json.loads(ckpt["structure"]))
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
    assert s2 == s and s["backbone"] == "resnet18" and s["options"]["router"] == "transformer"
    assert [c["id"] for c in s["root"]["children"]] == ["0/0", "0/1", "0/stop"]


# ----------------------------------------------------------------------------- repo hygiene and bad input


def test_torch_and_torchvision_import_from_repo_dir_despite_profile_py():
    """profile.py shadows the stdlib module cProfile imports (DESIGN §1); torch must still import."""
    code = ("import torch, torchvision, cProfile, profile; "
            "assert profile.Profile.__module__ == '_stdlib_profile'; "
            "assert callable(profile.run) and callable(profile.runctx) and profile._Utils; "
            "cProfile.run('1+1')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_bad_names_list_the_valid_ones(r18):
    with pytest.raises(ValueError, match="resnet18.*densenet121"):
        make_backbone("vgg16")
    with pytest.raises(ValueError, match="transformer, mlp, conv"):
        JulietNet(r18, router="lstm")
    with pytest.raises(ValueError, match="top1, gumbel"):
        JulietNet(r18, policy="sample")
    with pytest.raises(ValueError, match="both, grow-only, prune-only, off"):
        GrowPruneConfig(mode="sometimes")
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
        JulietNet(r18, beta=1.0)
