"""Conditional branching on heterogeneous inputs: the split-share growth trigger, fresh siblings, split priors.

Two "domains" are inputs a 2-way split tells apart (contrast and offset); one domain is one Gaussian blob.
"""

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_backbone
from grow_prune import GrowPruneConfig, end_epoch, grow, prune_unvisited, update_split
from losses import split_loss
from measure import node_visits
from trie import JulietNet, TrieNode


@pytest.fixture(scope="module")
def r18():
    return tiny_backbone()  # four small conv stages: the same trie code at a fraction of ResNet-18's cost


def two_domains(n, gen, size=16):
    """Half the batch dim and noisy, half bright and smooth: two clusters in any feature space."""
    a = torch.randn(n // 2, 3, size, size, generator=gen)
    b = 0.2 * torch.randn(n - n // 2, 3, size, size, generator=gen) + 2.0
    return torch.cat([a, b])


def share_of(x, steps=200, beta=0.9):
    node = TrieNode("0/0", 1, torch.nn.Identity(), in_channels=x.shape[1])
    for _ in range(steps):
        update_split(node, x, beta)
    return float(node.split_share), node


def test_split_share_is_high_for_two_clusters_and_low_for_one_blob():
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(1, 64, 1, 1, generator=gen).abs() * 3
    blob = centre + torch.randn(256, 64, 1, 1, generator=gen)  # one cluster, offset like post-ReLU features
    direction = torch.randn(1, 64, 1, 1, generator=gen)
    side = torch.randint(0, 2, (256,), generator=gen).bool()
    pair = blob + 3 * direction * side[:, None, None, None].float()  # two clusters
    one, _ = share_of(blob)
    two, node = share_of(pair)
    assert 0.0 < one < 0.2 and two > 0.5, (one, two)
    v = node.principal[1]
    assert torch.allclose(v.norm(), torch.tensor(1.0), atol=1e-4)  # a unit direction...
    u = torch.nn.functional.normalize(pair.flatten(1), dim=1)
    gap = torch.nn.functional.normalize(u[side].mean(0) - u[~side].mean(0), dim=0)
    assert abs(float(v @ gap)) > 0.9  # ...along the gap between the clusters


def trained_two_domain_trie(r18, steps, cfg, seed=0, split_weight=1.0, lr=1e-3, grow_until=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = JulietNet(r18, selector="mlp", d_model=16, n_head=2, stage_grad=0.0, ema_beta=0.9)
    opt = torch.optim.Adam(net.parameters(), lr)
    events = []
    for step in range(1, steps + 1):
        net.train()
        x = two_domains(16, gen)
        logits, record = net(x, return_record=True)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(16) % 4) + split_weight * split_loss(record)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if grow_until is None or step <= grow_until:
            events += grow(net, cfg, step, record.leaf_counts, opt)
    return net, events, gen


def test_split_growth_grows_one_fresh_sibling_where_the_inputs_split_with_its_prior(r18):
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="split", theta_grow=0.4, grow_every=10, m_max=2)
    net, events, _ = trained_two_domain_trie(r18, 10, cfg)
    assert [e["kind"] for e in events] == ["grow"] and events[0]["statistic"] == "split_share"
    assert events[0]["value"] > 0.4
    new = net.node(events[0]["node"])
    old = next(k for k in net.parent(new).stage_branches if k is not new)
    assert new.prior.shape == (2, net.backbone.stages[new.depth - 1].channels)
    assert not new.branches and old.branches  # Alg. 2: a fresh stage, a leaf; its source keeps its subtree
    w_new, w_old = (k.sub.get_submodule(net.backbone.stages[new.depth].sig_name).weight.detach() for k in (new, old))
    assert abs(float(torch.nn.functional.cosine_similarity(w_new.flatten(), w_old.flatten(), 0))) < 0.2
    assert all(float(k.split_share) == 0 for k in net.parent(new).stage_branches)  # restarted after the split
    assert float(new.alpha) == float(old.alpha) > 0  # the newcomer starts with half its source's usage


def test_no_split_growth_below_theta_grow_nor_under_the_paper_statistic(r18):
    high = GrowPruneConfig(grow_prune="both", grow_statistic="split", theta_grow=0.99, grow_every=5)
    assert trained_two_domain_trie(r18, 10, high)[1] == []
    paper = GrowPruneConfig(grow_prune="both", grow_statistic="sigma2", theta_grow=0.99, grow_every=5)
    assert trained_two_domain_trie(r18, 10, paper)[1] == []


def test_split_loss_teaches_the_parent_which_samples_are_the_specialists(r18):
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="split", theta_grow=0.3, grow_every=5, m_max=2)
    net, events, gen = trained_two_domain_trie(r18, 60, cfg, lr=3e-3, grow_until=5)  # one split, then learn it
    new = net.node(events[0]["node"])  # the first split, at the node whose inputs are the two domains
    parent = net.parent(new)
    net.eval()
    x = two_domains(64, gen)
    with torch.no_grad():
        _, paths = net(x, return_paths=True, stop_threshold=1.0)
    took = torch.tensor([p.startswith(new.node_id + "/") or p == new.node_id for p in paths])
    domain = torch.arange(64) >= 32
    agree = max(float((took == domain).float().mean()), float((took != domain).float().mean()))
    assert 0.2 < float(took.float().mean()) < 0.8 and agree > 0.9, (float(took.float().mean()), agree)
    assert parent.selector is not None


def test_split_loss_is_the_binary_cross_entropy_and_lets_a_diverged_step_report_nan():
    """Its formula on a hand-made record, and a NaN share gives a NaN loss (the training step then
    stops with one line) instead of F.binary_cross_entropy's RuntimeError on inputs outside [0, 1]."""
    side = torch.tensor([1.0, 0.0, 1.0])
    P = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])  # stage, stage, stop
    record = SimpleNamespace(routed=[SimpleNamespace(sides=[None, side], P=P)], leaf_depth=torch.zeros(3))
    share = P[:, 1] / P[:, :2].sum(1)
    want = -(side * share.log() + (1 - side) * (1 - share).log()).mean()
    torch.testing.assert_close(split_loss(record), want)
    record.routed[0] = SimpleNamespace(sides=[None, side], P=torch.full((3, 3), float("nan")))
    assert split_loss(record).isnan()


def test_a_split_trie_saves_loads_and_an_unused_specialist_is_pruned(r18, tmp_path):
    cfg = GrowPruneConfig(grow_prune="both", grow_statistic="split", theta_grow=0.3, grow_every=5, m_max=2,
                          prune_every=1, t_min=1)
    net, events, gen = trained_two_domain_trie(r18, 12, cfg)
    new = net.node(events[0]["node"])
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    twin = JulietNet.from_structure(net.structure(), tiny_backbone())
    twin.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = two_domains(32, gen)
    net.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))
        assert torch.equal(twin.node(new.node_id).prior, new.prior)
    new.alpha.fill_(0.0)  # nobody goes there any more: Alg. 3 removes it at the next sweep
    events = end_epoch(net, cfg, epoch=1, step=13)
    assert [(e["kind"], e["node"]) for e in events] == [("prune", new.node_id)]
    with torch.no_grad():
        net(x)  # still runs, one stage child fewer


def test_the_kept_trie_loses_the_siblings_validation_rarely_reaches_and_saves_loads_identically(r18, tmp_path):
    torch.manual_seed(0)
    net = JulietNet(r18, selector="mlp", d_model=16, n_head=2)
    quiet = net.add_child(net.root)        # 0/1 beside the chain's 0/0
    busy = net.add_child(net.node("0/0"))  # 0/0/1 beside 0/0/0
    # the root sends 1 of 41 stage-bound samples to 0/1 (< theta_prune), 0/0 sends 20 of 40 to 0/0/1; at 0/0/0
    # every sample stops but 1, which reaches the chain's lone last stage: a single stage child is never pruned
    counts = {"0/stop": 9, "0/1": 1, "0/0/stop": 0, "0/0/1": 20, "0/0/0/stop": 19, "0/0/0/0": 1}
    cfg = GrowPruneConfig(grow_prune="both", theta_prune=0.1)  # prune_kept: on by default
    for off in (GrowPruneConfig(grow_prune="both", theta_prune=0.1, prune_kept=False),
                GrowPruneConfig(grow_prune="grow-only", theta_prune=0.1)):  # the switch and the mode gate it
        assert prune_unvisited(net, off, node_visits(net, counts), step=7) == []
    events = prune_unvisited(net, cfg, node_visits(net, counts), step=7)
    assert [(e["kind"], e["node"], e["statistic"]) for e in events] == [("prune", "0/1", "val_share")]
    assert events[0]["value"] == round(1 / 41, 6)
    assert [k.node_id for k in net.root.stage_branches] == ["0/0"] and net.node(busy.node_id) is busy
    assert quiet.node_id not in {n.node_id for n in net.nodes()}
    no_evidence = node_visits(net, {"0/stop": 5})  # no sample below the root
    assert prune_unvisited(net, cfg, no_evidence, step=8) == []
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    twin = JulietNet.from_structure(net.structure(), r18)
    twin.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = torch.randn(16, 3, 16, 16)
    net.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(net(x), twin(x))
