"""Tests for Juliet. Run: make test  (or .venv/bin/python -m pytest -q test_juliet.py)

Equivalence tests in the micrograd/minGPT manner: a chain trie equals its backbone, batched routing
equals each sample run alone, pruning an unused branch leaves logits unchanged, save/load is exact.
"""

import copy
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import profile as prof  # Juliet's profile.py, first on sys.path (DESIGN §1)
import shutil
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import sweep
import train_cifar
import train_imagenet
from backbones import BACKBONES, make_backbone, static_model
from grow_prune import GrowPruneConfig, end_epoch, grow, prune_sweep, sync_optimizer
from routers import SELECTORS, make_selector
from trie import JulietNet

REPO = os.path.dirname(os.path.abspath(__file__))
assert hasattr(prof, "paper_macs"), "the stdlib profile module shadowed Juliet's profile.py"
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
        chain = net.path(paths[0])
        assert chain[-1].depth > 0 and chain[0] is net.root
        h = x[:1]
        for node in chain:
            h = node.sub(h)
        torch.testing.assert_close(net.head(net.adapt(h.mean((2, 3))))[0], logits[0], rtol=0, atol=1e-5)


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


def test_exit_loss_trains_every_exit_on_every_sample_that_reached_it(r18):
    net = grown_trie(r18).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    net(x)
    exits = {len(idx) for idx, _, _ in net._exits}
    assert 16 in exits  # the root's exit sees the whole batch, whatever the root chose
    loss = net.exit_loss(y)
    loss.backward()
    assert float(loss) > 0 and net.adapters["64"].weight.grad.abs().sum() > 0
    assert net.root.sub[0].weight.grad.abs().sum() > 0  # deep supervision reaches the stem


def test_route_loss_gradient_is_exit_loss_minus_path_loss(r18):
    """d route_loss / d P_stop = (l_exit - l_path) / (B_n * number of exits): stop where the exit is as good."""
    net = routed_trie(r18).train()
    x, y = varied_batch(24, torch.Generator().manual_seed(1)), torch.randint(0, 10, (24,))
    logits = net(x)
    for _, _, p_stop in net._exits:
        p_stop.retain_grad()
    net.route_loss(logits, y).backward()
    with torch.no_grad():
        path_ce = F.cross_entropy(logits, y, reduction="none")
        for idx, pooled, p_stop in net._exits:
            exit_ce = F.cross_entropy(net.head(net.adapt(pooled)), y[idx], reduction="none")
            want = (exit_ce - path_ce[idx]) / len(idx) / len(net._exits)
            torch.testing.assert_close(p_stop.grad, want, rtol=1e-4, atol=1e-6)


def test_routing_warmup_freezes_selectors_only(r18):
    net = grown_trie(r18, stop_bias=-2.0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_cifar.freeze_routing(net, True)
    sel0 = [p.detach().clone() for p in net.root.selector.parameters()]
    stem0 = net.root.sub[0].weight.detach().clone()
    train_step(net, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(sel0, net.root.selector.parameters()))
    assert not torch.equal(stem0, net.root.sub[0].weight)
    net.eval()
    with torch.no_grad():  # a new trie with stop_bias -2 runs every sample at full depth
        assert set(net(x, return_paths=True)[1]) <= {"0/0/0/0/0", "0/0/1", "0/1/0"}
    train_cifar.freeze_routing(net, False)
    train_step(net, opt, x, y)
    assert any(not torch.equal(a, b) for a, b in zip(sel0, net.root.selector.parameters()))


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
    net.last_leaf_counts = {"0/0/0": 8}  # depth 2 is max_depth: it grows a sibling, but 0/0 is full
    assert grow(net, cfg, 12) == []
    net.last_leaf_counts = {"0/stop": 8}  # a stop leaf grows at its parent
    assert [e["node"] for e in grow(net, cfg, 13)] == ["0/1"]
    net.node("0/1").sigma2.fill_(1.0)
    net.last_leaf_counts = {"0/1": 8}  # 0/1 can deepen
    assert [e["node"] for e in grow(net, cfg, 14)] == ["0/1/0"]
    net.node("0/1/0").sigma2.fill_(1.0)
    net.last_leaf_counts = {"0/1/0": 8}  # at max_depth: a sibling of its own stage
    assert [e["node"] for e in grow(net, cfg, 15)] == ["0/1/1"]
    assert net.node("0/1/1").depth == 2


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


# ----------------------------------------------------------------------------- train_cifar.py (issue 3)

RUN_FILES = ["config.json", "model_profile.json", "epoch_1.json", "checkpoint.pt", "final.json", "accuracy.png"]
EPOCH_KEYS = ["train_loss", "val_loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr", "params",
              "train_flops_epoch_paper_convention_macs", "time_train_s", "time_val_s", "events",
              "energy_train_j", "energy_train_status", "peak_memory_bytes"]
JULIET_EPOCH_KEYS = ["val_node_visits", "val_node_throughput_img_s", "val_executed_macs_per_sample",
                     "train_flops_epoch_executed_macs", "train_node_visits", "n_nodes"]
FINAL_KEYS = ["test_top1", "test_top5", "test_executed_macs_per_sample", "flops_paper_convention_macs", "params"]


def write_cifar10(root, n_train=40, n_test=20, seed=0):
    """A tiny CIFAR-10 in the real on-disk format (cifar-10-batches-py, pickled batches).

    torchvision checks each file's md5 against the real release; the tests pin those checksums to the
    tiny files' own (see `pinned_cifar10`), so the real parsing and integrity-check code runs on them.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        labels = (np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = (np.array(labels)[:, None] * 25).astype(np.uint8)  # red channel encodes the class
        with open(os.path.join(folder, name), "wb") as f:
            # the real files are Python 2 pickles whose keys load as str under encoding="latin1"
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_train // 5}, f, protocol=2)
    return {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in [*names, "batches.meta"]}


@pytest.fixture
def pinned_cifar10(tmp_path, monkeypatch):
    md5 = write_cifar10(tmp_path / "cifar")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setitem(cls.meta, "md5", md5["batches.meta"])
    return tmp_path / "cifar"


def write_image_folder(root, n_per_class=6, classes=3, size=32, bad=None):
    for split in ("train", "test"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d)
            for i in range(n_per_class):
                side = bad if (bad and split == "train" and c == 0 and i == 0) else size
                arr = np.full((side, side, 3), 40 * c + 3 * i, dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"{i}.png"))
    return root


def cifar_args(out, *extra):
    return train_cifar.parse_args(["--out", str(out), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                                   "--quiet", *extra])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_cifar10_batches_through_torchvision_loader_static_baseline(pinned_cifar10, tmp_path):
    out = tmp_path / "run"
    final = train_cifar.main(cifar_args(out, "--dataset", "cifar10", "--data-dir", str(pinned_cifar10), "--static"))
    config = read_json(out / "config.json")
    assert (config["train_size"], config["val_size"], config["test_size"]) == (36, 4, 20)  # 90/10 split
    profile_json = read_json(out / "model_profile.json")
    assert round(profile_json["flops_paper_convention_macs"] / 1e6, 2) == 37.22
    assert round(profile_json["params"] / 1e6, 2) == 11.18 and profile_json["proxy"] is False
    assert final["test_executed_macs_per_sample"] == final["flops_paper_convention_macs"]
    for name in RUN_FILES:
        assert (out / name).exists(), name


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0", "densenet121", "resnet101"])
def test_one_epoch_of_each_backbone_writes_the_run_directory(tmp_path, backbone):
    data = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    final = train_cifar.main(cifar_args(out, "--dataset", "imagefolder", "--data-dir", str(data),
                                        "--backbone", backbone, "--grow-every", "1", "--grow-threshold", "0"))
    for name in [*RUN_FILES, "node_usage.png", "trie.png"]:
        assert (out / name).exists(), name
    epoch = read_json(out / "epoch_1.json")
    assert all(k in epoch for k in EPOCH_KEYS + JULIET_EPOCH_KEYS), set(EPOCH_KEYS + JULIET_EPOCH_KEYS) - set(epoch)
    assert all(k in final for k in FINAL_KEYS)
    assert epoch["n_nodes"] > len(make_backbone(backbone).stages)  # stop children, plus growth at threshold 0
    assert any(e["kind"] == "grow" for e in epoch["events"])
    assert math.isnan(epoch["energy_train_j"]) and epoch["energy_train_status"]  # no NVML on CPU: NaN + reason
    assert 0 < final["test_executed_macs_per_sample"]
    profile_json = read_json(out / "model_profile.json")
    assert profile_json["proxy"] is True and profile_json["dataset"] == "imagefolder"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "structure", "optimizer", "scheduler", "run", "args", "rng"} <= set(ckpt)


def test_resume_is_exact(tmp_path):
    common = ["--dataset", "synthetic", "--synthetic-size", "160", "--batch-size", "16", "--router", "mlp",
              "--grow-every", "2", "--grow-threshold", "0", "--prune-every", "1", "--t-min", "1", "--seed", "3",
              "--route-warmup", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_cifar.main(train_cifar.parse_args(["--out", str(a), "--epochs", "2", "--workers", "0", "--quiet", *common]))
    train_cifar.main(train_cifar.parse_args(["--out", str(b), "--epochs", "1", "--workers", "0", "--quiet", *common]))
    train_cifar.main(train_cifar.parse_args(["--resume", str(b), "--epochs", "2", "--quiet"]))
    ea, eb = read_json(a / "epoch_2.json"), read_json(b / "epoch_2.json")
    assert ea["events"], "the run should grow and prune, so that resume must restore a changed trie"
    for k in ["train_loss", "val_loss", "val_top1", "train_top1", "lr", "structure", "events", "val_leaf_counts"]:
        assert ea[k] == eb[k], k
    assert read_json(a / "final.json")["test_top1"] == read_json(b / "final.json")["test_top1"]


def test_synthetic_set_is_seeded_learnable_shape_and_mixed():
    a, b = train_cifar.SyntheticImages(200, seed=5), train_cifar.SyntheticImages(200, seed=5)
    assert np.array_equal(a.data, b.data) and a.targets == b.targets
    assert a.data.shape == (200, 32, 32, 3) and a.data.dtype == np.uint8
    assert set(a.targets) == set(range(10)) and 0.35 < float(a.hard.float().mean()) < 0.65
    c = train_cifar.SyntheticImages(200, seed=6)
    assert not np.array_equal(a.data, c.data)
    # easy samples carry their class colour: the class mean colour separates them, the hard ones' does not
    img = torch.tensor(a.data).float().mean((1, 2))  # (N, 3)
    y = torch.tensor(a.targets)
    spread = [img[(y == k) & ~a.hard].std(0).mean() for k in range(10)]
    assert max(spread) < 20


def run_cli(*argv, cwd=REPO):
    return subprocess.run([sys.executable, "train_cifar.py", *argv], cwd=cwd, capture_output=True, text=True)


def one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_input_ends_with_one_line_and_keeps_existing_runs(tmp_path):
    base = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet"]
    assert "resnet18" in one_line_error(run_cli("--backbone", "vgg16", *base))
    assert "[0, 1]" in one_line_error(run_cli("--grow-threshold", "1.5", *base))
    missing = tmp_path / "nowhere"
    line = one_line_error(run_cli("--dataset", "imagefolder", "--data-dir", str(missing), *base), code=1)
    assert "does not exist" in line
    bad = write_image_folder(tmp_path / "bad", bad=28)
    assert "28x28" in one_line_error(run_cli("--dataset", "imagefolder", "--data-dir", str(bad), *base), code=1)
    (tmp_path / "afile").write_text("")
    line = one_line_error(run_cli("--dataset", "synthetic", "--synthetic-size", "100", "--out",
                                  str(tmp_path / "afile" / "run"), *base), code=1)
    assert "cannot write" in line
    line = one_line_error(run_cli("--dataset", "synthetic", "--synthetic-size", "100", "--lr", "1e30",
                                  "--out", str(tmp_path / "nan"), *base), code=1)
    assert "loss is nan" in line or "loss is inf" in line
    # an existing run is never overwritten: its checkpoint stays byte-identical
    run = tmp_path / "run"
    train_cifar.main(cifar_args(run, "--dataset", "synthetic", "--synthetic-size", "100", "--static"))
    digest = hashlib.md5((run / "checkpoint.pt").read_bytes()).hexdigest()
    line = one_line_error(run_cli("--dataset", "synthetic", "--synthetic-size", "100", "--out", str(run), *base),
                          code=1)
    assert "--resume" in line
    assert hashlib.md5((run / "checkpoint.pt").read_bytes()).hexdigest() == digest


def test_cifar10_missing_says_how_to_download(tmp_path):
    line = one_line_error(run_cli("--data-dir", str(tmp_path), "--epochs", "1", "--quiet"), code=1)
    assert "--download" in line and str(tmp_path) in line


def test_help_names_the_paper_source_of_defaults():
    text = run_cli("--help").stdout
    assert "Table 2" in text and "Alg. 2" in text and "§4.1" in text


# ----------------------------------------------------------------------------- profile.py (issue 4)


@pytest.fixture(scope="module")
def routed():
    """A routed resnet18 trie and a batch of 32 varied images it sends down at least 3 different paths."""
    net = routed_trie(make_backbone("resnet18"))
    x = varied_batch(32, torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, paths = net(x, return_paths=True)
    assert len(set(paths)) >= 3, paths
    return net, x, paths


# FLOPs (MACs)


def test_paper_convention_reproduces_table4_baselines():
    expected = {"resnet18": (37.22, 11.18), "densenet121": (59.11, 6.96)}
    for name, (macs_m, params_m) in expected.items():
        macs, params = prof.paper_macs(static_model(name, num_classes=10), input_size=32)
        assert (round(macs / 1e6, 2), round(params / 1e6, 2)) == (macs_m, params_m), name


def test_thop_counts_the_selectors_attention_by_hand(monkeypatch):
    """A full-depth chain path runs 4 transformer selectors over L = 1 feature + 2 branch tokens; without our
    MultiheadAttention rule THOP 0.1.1 counts each as 0."""
    torch.manual_seed(0)
    E, L = 16, 3
    net = JulietNet(make_backbone("resnet18"), router="transformer", d_model=E, n_head=2)
    leaf = "0/0/0/0/0"
    with_op = prof.path_macs(net, leaf)
    monkeypatch.setattr(prof, "thop_custom_ops", dict)
    without = prof.path_macs(net, leaf)
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
        assert prof._thop(sel, f, sig, True)[0] == want, name


def test_expected_macs_equal_the_mean_of_per_sample_executed_macs(routed):
    """Independent check: each sample alone through the real trie under THOP counts what it executed."""
    net, x, paths = routed
    counts = prof.count_leaves(net, [(x, torch.zeros(len(x)))], "cpu")
    assert sum(counts.values()) == len(x) and len(counts) >= 3
    exp = prof.expected_macs(net, counts)
    per_sample = [prof.paper_macs(net, x=x[i:i + 1])[0] for i in range(len(x))]
    assert exp["expected_macs_per_sample"] == pytest.approx(sum(per_sample) / len(x), rel=0.01)
    assert len(set(per_sample)) >= 3  # different paths, different costs
    assert exp["nodes"]["0"]["visits"] == len(x) and exp["nodes"]["0"]["freq"] == 1.0
    assert exp["nodes"]["0/0"]["visits"] == sum(c for leaf, c in counts.items() if leaf.startswith("0/0/"))
    assert sum(p["freq"] for p in exp["paths"].values()) == pytest.approx(1.0)


def test_thop_and_flop_counter_agree_on_every_path(routed):
    net, _, _ = routed
    for leaf, macs in prof.path_macs_table(net).items():
        fc = prof.path_flops_counter(net, leaf) / 2
        assert abs(macs - fc) / macs < 0.03, (leaf, macs, fc)


def test_flop_counter_sees_the_transformer_selectors():
    """In eval under no_grad the fused encoder kernel is invisible to FlopCounterMode; `countable` prevents that."""
    torch.manual_seed(0)
    net = JulietNet(make_backbone("resnet18"), router="transformer")
    leaf = "0/0/0/0/0"
    thop_macs, fc = prof.path_macs(net, leaf), prof.path_flops_counter(net, leaf) / 2
    assert abs(thop_macs - fc) / thop_macs < 0.03
    sel, f = net.root.selector, torch.randn(1, 64, 8, 8)
    with prof.countable():
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            sel(f, net.signatures(net.root), True)
    d, L = 64, 3
    assert counter.get_total_flops() / 2 >= 4 * L * d * d + 2 * L * L * d + 2 * L * d * 2 * d


def test_paper_convention_follows_the_dummys_path_only(routed):
    net, _, _ = routed
    table = prof.path_macs_table(net)
    leaf = prof.dummy_path(net)
    assert prof.paper_macs(net)[0] == table[leaf]
    assert len(set(table.values())) == len(table)  # every path costs something else


def test_executed_params(routed):
    net, _, _ = routed
    stem_only = prof.executed_params(net, {"0/stop": 5})
    want = sum(p.numel() for m in (net.root.sub, net.root.selector, net.adapters["64"], net.head)
               for p in m.parameters())
    assert stem_only == want
    everything = prof.executed_params(net, {leaf.node_id: 1 for leaf in net.leaves()})
    assert stem_only < everything <= prof.total_params(net)


# memory and wall time


def test_peak_memory_on_cpu():
    model = static_model("resnet18")
    train = prof.peak_memory(model, batch=8, train=True)
    infer = prof.peak_memory(model, batch=8, train=False)
    grads_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    assert train["peak_step_mb"] > grads_mb > infer["peak_step_mb"] > 0  # training keeps grads + activations
    assert train["peak_total_mb"] == pytest.approx(train["peak_step_mb"] + train["before_step_mb"])
    assert "excluded" in train["includes"] and train["mode"] == "train" and infer["mode"] == "inference"


def test_bench_tiny_and_its_markdown():
    r = prof.bench("resnet18", batch=8, repeats=2, warmup=1)
    for name in ("static", "juliet_chain"):
        assert r["models"][name]["train"]["median_s"] > 0 and r["models"][name]["inference"]["median_s"] > 0
        assert r["models"][name]["train"]["n"] == 2
        assert 0 < r["models"][name]["conv_bwd_share"] < 1
    assert r["ratios"]["juliet_chain"]["train"] > 0 and r["ratios"]["static"]["train"] == 1.0
    table = prof.format_bench(r)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| metric | static |") and set(lines[1]) <= set("|- ")
    assert len(lines) == 6


def test_no_early_exit_sends_everyone_to_full_depth():
    torch.manual_seed(0)
    net = prof._no_early_exit(JulietNet(make_backbone("resnet18"), router="mlp")).eval()
    with torch.no_grad():
        _, paths = net(torch.randn(16, 3, 32, 32), return_paths=True)
    assert set(paths) == {"0/0/0/0/0"}


# energy


def test_trapezoid_joules():
    assert prof.trapezoid_joules([0.0, 0.5, 2.0, 3.0], [40.0] * 4) == pytest.approx(120.0)  # P x T
    assert prof.trapezoid_joules([0.0, 1.0, 2.0], [0.0, 10.0, 20.0]) == pytest.approx(20.0)  # ramp: exact
    assert prof.trapezoid_joules([], []) == 0.0 and prof.trapezoid_joules([1.0], [50.0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        prof.trapezoid_joules([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="increasing"):
        prof.trapezoid_joules([0.0, 1.0, 1.0], [1.0, 1.0, 1.0])


def test_nvml_absent_gives_nan_and_the_reason():
    ok, reason = prof.nvml_status()
    if ok:
        pytest.skip("NVML is present: this test is about machines without it (CI, this CPU box)")
    assert reason.startswith(("NVML unavailable", "nvidia-ml-py not installed"))
    with prof.EnergyMeter() as meter:
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
    assert prof.nvml_status()[0] is True
    with prof.EnergyMeter(interval_s=0.01) as meter:
        time.sleep(0.2)
    assert len(meter._samples) >= 5
    span = meter._samples[-1][0] - meter._samples[0][0]
    assert meter.joules == pytest.approx(100 * span) and meter.counter_joules == pytest.approx(100 * span, rel=0.2)
    assert meter.as_dict(images=10)["energy_j_per_image"] == pytest.approx(meter.joules / 10)


# CLI and runs


def test_cli_static_json_keys():
    cmd = [sys.executable, "profile.py", "--backbone", "resnet18", "--static", "--json", "--batch", "4"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("dataset", "input_size", "params", "flops_paper_convention_macs", "flops_paper_convention_note",
                "proxy", "nvml_available", "nvml_status", "memory", "counters"):
        assert key in d, key
    assert round(d["flops_paper_convention_macs"] / 1e6, 2) == 37.22 and d["proxy"] is False
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
    comes through train_cifar.make_test_loader, model_profile.json is merged, and Table 4 + its plot."""
    common = ["--dataset", "synthetic", "--synthetic-size", "120", "--router", "mlp", "--stop-bias", "0"]
    juliet, static = tmp_path / "juliet", tmp_path / "static"
    final = train_cifar.main(cifar_args(juliet, *common))
    train_cifar.main(cifar_args(static, *common, "--static"))

    p = prof.profile_run(str(juliet))
    assert p["expected_macs_per_sample"] == pytest.approx(final["test_executed_macs_per_sample"])
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


# ----------------------------------------------------------------------------- train_imagenet.py (issue 5)


def write_imagenet(root, empty_class=False):
    """A tiny ImageNet in ImageFolder layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, odd image sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c in range(3):
            d = os.path.join(root, split, f"n0{c}")
            os.makedirs(d)
            for i in range(0 if (empty_class and c == 2 and split == "val") else n):
                Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.JPEG"))
    return root


def test_imagenet_one_epoch_writes_the_run_directory(tmp_path):
    data, out = write_imagenet(tmp_path / "inet"), tmp_path / "run"
    args = train_imagenet.parse_args(["--data-dir", str(data), "--input-size", "32", "--epochs", "1",
                                      "--batch-size", "4", "--workers", "0", "--lr", "0.01", "--out", str(out),
                                      "--quiet"])
    assert (args.backbone, args.optimizer, args.scheduler, args.prebuild) == ("resnet101", "sgd", "cosine", 10)
    final = train_imagenet.main(args)
    for name in [*RUN_FILES, "energy.png", "top1_per_gflop.png", "trie.png"]:
        assert (out / name).exists(), name
    epoch = read_json(out / "epoch_1.json")
    for key in ["energy_train_j", "energy_val_j", "energy_train_j_per_image", "throughput_train_img_s",
                "val_node_visits", "val_class_depth", "val_node_throughput_img_s"]:
        assert key in epoch, key
    assert math.isnan(epoch["energy_train_j"]) and math.isnan(epoch["energy_val_j"])
    assert "NVML" in epoch["energy_train_status"]
    assert set(epoch["val_class_depth"]) == {"0", "1", "2"}
    assert epoch["n_nodes"] >= 10 and final["test_samples"] == 9


def test_imagenet_bad_input(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "train_imagenet.py", "--epochs", "1", "--workers", "0", "--quiet",
                               "--input-size", "32", "--batch-size", "2", *argv],
                              cwd=REPO, capture_output=True, text=True)

    shutil.rmtree(write_imagenet(tmp_path / "noval") / "val")
    assert "val does not exist" in one_line_error(run("--data-dir", str(tmp_path / "noval")), code=1)
    assert "train does not exist" in one_line_error(run("--data-dir", str(tmp_path / "nothing")), code=1)
    data = write_imagenet(tmp_path / "empty", empty_class=True)
    assert "n02" in one_line_error(run("--data-dir", str(data)), code=1)


# ----------------------------------------------------------------------------- sweep.py (issue 5)

State = optuna.trial.TrialState
TINY = ["--epochs", "1", "--dataset", "synthetic", "--backbone", "resnet18", "--",
        "--synthetic-size", "120", "--batch-size", "16", "--workers", "0", "--limit-batches", "2"]


@pytest.fixture
def one_thread():
    """The runs here are tiny and overhead-bound; one thread avoids OpenMP oversubscription on a busy machine
    (2 threads next to another training job made each run ~8x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_study(out) -> optuna.Study:
    return optuna.load_study(study_name="juliet", storage=f"sqlite:///{out}/study.db")


def scripted_runs(monkeypatch, curves):
    """train_cifar.main replaced by runs that report the given val top-1 per epoch (one curve per run) at
    1 M executed MACs per sample, against a 2 M static backbone: c = 0.5."""
    runs = iter(curves)

    def main(args, on_epoch=None):
        os.makedirs(args.out)
        curve = next(runs)
        for epoch, top1 in enumerate(curve, 1):
            on_epoch({"epoch": epoch, "val_top1": top1, "val_executed_macs_per_sample": 1e6,
                      "flops_paper_convention_macs": 1e6, "params": 10})
        return {"test_top1": curve[-1], "test_executed_macs_per_sample": 1e6, "flops_paper_convention_macs": 1e6,
                "wall_time_s": 0.0}

    monkeypatch.setattr(sweep.train_cifar, "main", main)
    monkeypatch.setattr(sweep, "static_macs", lambda run_dir: 2e6)


@pytest.mark.usefixtures("one_thread")
def test_sweep_finishes_then_the_same_command_continues_the_study(tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep.main(["--trials", "3", "--out", str(out), *TINY])
    study = load_study(out)
    first = [(t.number, t.state, t.params, t.value, t.datetime_start) for t in study.trials]
    assert [t.state for t in study.trials] == [State.COMPLETE] * 3  # 1 epoch: never pruned at the last epoch
    best = json.loads((out / "best.json").read_text())
    assert set(best["params"]) == {dest for dest, *_ in sweep.SPACE} and best["objective_L"] == study.best_value
    m = best["metrics"]
    assert 0 <= m["accuracy"] <= 1 and m["static_macs"] == pytest.approx(37.22e6, rel=1e-3)  # Table 4 ResNet-18
    assert m["c"] == pytest.approx(m["val_executed_macs"] / m["static_macs"])
    assert best["objective_L"] == pytest.approx(1 - m["accuracy"] + 0.1 * m["c"])  # §6.2, default lambda
    assert {"params", "wall_time_s", "run_dir", "test_top1"} <= set(m) and os.path.isdir(m["run_dir"])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "importances.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert sum(line.startswith(f"| {k} | COMPLETE |") for line in printed.splitlines() for k in range(3)) == 3

    sweep.main(["--trials", "4", "--out", str(out), *TINY])
    study = load_study(out)
    assert len(study.trials) == 4 and all(t.state in sweep.FINISHED for t in study.trials)
    assert [(t.number, t.state, t.params, t.value, t.datetime_start) for t in study.trials[:3]] == first
    assert study.trials[3].params != study.trials[0].params  # resumed sampler does not replay trial 0
    assert (out / "trial_3" / "final.json").is_file() and len((out / "trials.md").read_text().splitlines()) == 6


@pytest.mark.usefixtures("one_thread")
def test_median_pruner_prunes_a_trial_below_the_median(tmp_path, monkeypatch):
    scripted_runs(monkeypatch, [[80, 85, 90], [80, 85, 90], [10, 10, 10]])
    out = tmp_path / "sweep"
    sweep.main(["--trials", "3", "--epochs", "3", "--dataset", "synthetic", "--backbone", "resnet18",
                "--pruner-startup-trials", "2", "--pruner-warmup-epochs", "0", "--out", str(out)])
    t = load_study(out).trials
    assert [x.state for x in t] == [State.COMPLETE, State.COMPLETE, State.PRUNED]
    assert t[0].value == pytest.approx(1 - 0.90 + 0.1 * 0.5) and t[0].intermediate_values[1] == pytest.approx(0.25)
    assert list(t[2].intermediate_values) == [1] and t[2].user_attrs["epochs_run"] == 1  # stopped after epoch 1
    assert (out / "pareto.png").is_file()


@pytest.mark.usefixtures("one_thread")
def test_a_trial_left_running_is_failed_not_counted_and_does_not_block(tmp_path, monkeypatch, capsys):
    scripted_runs(monkeypatch, [[50]] * 4)
    out = tmp_path / "sweep"
    flags = ["--epochs", "1", "--dataset", "synthetic", "--out", str(out)]
    sweep.main(["--trials", "2", *flags])
    load_study(out).ask()  # trial 2: RUNNING forever, like a trial whose process was killed
    sweep.main(["--trials", "3", *flags])
    t = load_study(out).trials
    assert [x.state for x in t] == [State.COMPLETE, State.COMPLETE, State.FAIL, State.COMPLETE]
    assert "marked trial(s) [2]" in capsys.readouterr().err
    with open(out / "sweep.lock", "w") as lock:  # a live sweep on the same directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="another sweep.py is running"):
            sweep.main(["--trials", "4", *flags])
    with pytest.raises(SystemExit, match=r"other settings \(lam: 0.1 -> 0.5\)"):
        sweep.main(["--trials", "4", "--lam", "0.5", *flags])
    assert len(load_study(out).trials) == 4


@pytest.mark.usefixtures("one_thread")
def test_ablation_grid_with_limit_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    sweep.main(["--ablations", "--limit", "2", "--out", str(out), *TINY])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| transformer |")]
    assert [r.split(" | ")[:3] for r in rows] == [["| transformer", "top1", "both"], ["| transformer", "top1",
                                                                                         "grow-only"]]
    assert (out / "transformer-top1-grow-only" / "final.json").is_file()
    assert (out / "ablations.md").read_text().count("| transformer |") == 2
    assert (out / "selector_curves.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a finished combination ran again")

    monkeypatch.setattr(sweep.train_cifar, "main", no_training)
    sweep.main(["--ablations", "--limit", "2", "--out", str(out), *TINY])
    assert sum(r.startswith("| transformer |") for r in capsys.readouterr().out.splitlines()) == 2


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bad", [["--grow-range", "0.9", "0.1"], ["--lr-range", "0", "1e-3"], ["--trials", "0"],
                                 ["--prune-range", "0.1", "1.5"], ["--", "--lr", "0.1"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--out", str(out), "--dataset", "synthetic", *bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("sweep.py: error: ")
    assert not out.exists()


@pytest.mark.usefixtures("one_thread")
def test_fig3_line_per_selector_is_its_top1_both_run_else_the_mean(tmp_path):
    runs = {"mlp-gumbel-off": [10, 20], "mlp-top1-off": [30, 40, 50], "conv-top1-both": [50, 60],
            "conv-gumbel-both": [0, 0]}
    for name, curve in runs.items():
        os.makedirs(tmp_path / name)
        for epoch, top1 in enumerate(curve, 1):
            (tmp_path / name / f"epoch_{epoch}.json").write_text(json.dumps({"epoch": epoch, "val_top1": top1}))
    grid = [("mlp", "gumbel", "off"), ("mlp", "top1", "off"), ("conv", "top1", "both"), ("conv", "gumbel", "both")]
    grid.append(("transformer", "top1", "both"))  # in the grid, never ran
    assert sweep.selector_curve(str(tmp_path), grid, "mlp") == ({1: 20, 2: 30, 3: 50}, "mlp (mean of 2 runs)")
    assert sweep.selector_curve(str(tmp_path), grid, "conv") == ({1: 50, 2: 60}, "conv (top1, both)")
    assert sweep.selector_curve(str(tmp_path), grid, "transformer") is None
    sweep.plot_selector_curves(str(tmp_path), grid)
    assert (tmp_path / "selector_curves.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_pareto_front_keeps_points_nobody_beats_on_both_axes():
    pts = [(10, 80), (5, 70), (20, 90), (12, 75), (5, 60), (30, 90)]  # (MACs, accuracy)
    assert sweep.pareto_front(pts) == [1, 0, 2]
