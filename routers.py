"""Path selectors and the routing decision (§3.1.2, §4.1, §5.3; Eq. 1; Alg. 1 lines 4, 5, 7).

Every selector has one interface, `selector(f, signatures, stop, exit_logits, prev_logits)`,
which returns one logit per branch, (B, K):

  f            (B, C, H, W)  the node's activations after its sub-module
  signatures   (K_s, S)      one weight signature per stage branch, the mean of a representative
                             conv's weights ("a compact weight signature from the child's
                             sub-module")
  stop         bool          whether the node has a stop branch (trie.py); it gets a learned token
  exit_logits  (B, classes)  the prediction a sample would leave with if it stopped here, or None
  prev_logits  (B, classes)  the exit before it on the path, or None (read by the calibration)

Each branch becomes a *branch token* (LayerNorm + Linear of its signature, or the stop token), so a
selector handles any number of branches, and one grown later (Alg. 2) is scored from its first step.
The three selectors differ in how they read f:

  transformer  §4.1: feature token Linear(LayerNorm(GAP(f))); a TransformerEncoderLayer over
               [feature || branches]; a linear head on each branch's output gives its logit
  mlp          §5.3: a 2-layer MLP embeds GAP(f); logit = <embedding, branch token> / sqrt(d)
  conv         §5.3: depthwise 3x3 conv + ReLU + GAP, projected, scored like mlp

The stop logit has a learned offset and, ours, two reads of the exit (README "Paper notes and
deviations"): `exit_confidence` adds a learned linear function, zero at first, of the exit's max
softmax, margin and entropy, which the paper's LayerNorm'd feature token cannot see; a held-out
`calibration` (7 numbers that calibrate.py fits on the validation set) refits P_stop.

The decision (Alg. 1 line 5) has one home, `decide`, built on the stop rule `stops`, which the exit
tables (exits.py) apply too. `partition` (line 7) splits a batch by it; `straight_through` carries
its gradient. `Record` is what a routed forward pass did: the losses' and exit tables' input.
"""

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: routers.py runs without the trie
    from trie import TrieNode

STOP = "stop"  # the local id of a node's stop branch, the last of its branches
STOP_RULES = {"half": 0.5, "argmax": None}  # stop rule -> the threshold it is (None: Alg. 1)
IDENTITY = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # [a, w_1..w_5, b]: no calibration


def confidence_features(exit_logits: torch.Tensor, prev_logits: torch.Tensor | None = None):
    """(B, 3): an exit's max softmax, top-2 margin and entropy / log(classes). Given the exit before
    it on the path, `prev_logits` (NaN rows: none), (B, 5): also whether that one predicted the same
    class, and its probability of this exit's class (0 where there is none; consecutive exits that
    agree are rarely wrong together, PABEE's "patience")."""
    p = exit_logits.float().softmax(-1)  # (B, classes)
    top2 = p.topk(min(2, p.shape[1]), dim=-1).values  # (B, 2); one class: (B, 1)
    entropy = torch.special.entr(p).sum(-1, keepdim=True) / math.log(max(2, p.shape[1]))  # (B, 1)
    x = [top2[:, :1], top2[:, :1] - top2[:, -1:], entropy]
    if prev_logits is not None:
        pred = p.argmax(-1, keepdim=True)  # (B, 1)
        prev = prev_logits.float().softmax(-1).nan_to_num(0.0)  # (B, classes)
        agree = (prev.argmax(-1, keepdim=True) == pred) & (prev.sum(-1, keepdim=True) > 0)  # (B, 1)
        x += [agree.float(), prev.gather(1, pred)]
    return torch.cat(x, 1)


def calibration_features(exit_logits: torch.Tensor, prev_logits: torch.Tensor | None = None):
    """(B, 5): confidence_features with the exit before it (0 where there is none: the root)."""
    x = confidence_features(exit_logits, prev_logits)
    return x if prev_logits is not None else F.pad(x, (0, 2))


# ----------------------------------------------------------------------------- selectors


class Selector(nn.Module):
    """What the selectors share: branch tokens from weight signatures, a learned stop token, the
    stop logit's learned offset, its read of the exit's confidence and its held-out calibration."""

    def __init__(self, channels: int, sig_dim: int, d_model: int, exit_confidence: bool = True):
        super().__init__()
        self.d_model = d_model
        if sig_dim:  # branch tokens (ConfidenceSelector has none)
            self.sig_proj = nn.Sequential(nn.LayerNorm(sig_dim), nn.Linear(sig_dim, d_model))
            self.stop_token = nn.Parameter(0.02 * torch.randn(d_model))
        self.stop_bias = nn.Parameter(torch.tensor(0.0))
        self.confidence = nn.Linear(3, 1) if exit_confidence else None
        if self.confidence is not None:  # zero: a new selector is the paper's
            nn.init.zeros_(self.confidence.weight), nn.init.zeros_(self.confidence.bias)
        # stop log-odds d' = a d + w . calibration_features + b, as [a, w_1..w_5, b]; not SGD's
        self.register_buffer("calibration", IDENTITY.clone())
        self.calibrated = False  # the calibration is not the identity (a flag: no sync per call)

    def set_calibration(self, coefficients: torch.Tensor) -> None:
        self.calibration.copy_(coefficients)
        self.calibrated = not torch.equal(self.calibration.cpu(), IDENTITY)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.calibrated = not torch.equal(self.calibration.cpu(), IDENTITY)  # a loaded fit

    def forward(self, f, signatures, stop: bool, exit_logits=None, prev_logits=None):
        logits = self.logits(f, signatures, stop)  # (B, K)
        if not stop:
            return logits
        prev = prev_logits if self.calibrated else None  # only the calibration reads it
        x = None if exit_logits is None else confidence_features(exit_logits, prev)  # (B, 3 or 5)
        offset = self.stop_bias  # the stop branch is last
        if self.confidence is not None and x is not None:
            offset = offset + self.confidence(x[:, :3]).to(logits.dtype)  # (B, 1)
        logits = torch.cat([logits[:, :-1], logits[:, -1:] + offset], 1)
        return self.calibrate(logits, x) if self.calibrated else logits

    def calibrate(self, logits, x: torch.Tensor | None = None) -> torch.Tensor:
        """P_stop replaced by sigmoid(d'), d' = `refit`(d, x), d its log-odds (the stop logit minus
        the stage logits' logsumexp) and x the exit's confidence_features (None: no exit read);
        stage branches keep their odds."""
        go = logits[:, :-1].float().logsumexp(-1, keepdim=True)  # (B, 1)
        d = self.refit(logits[:, -1:].float() - go, x)
        return torch.cat([logits[:, :-1], (d + go).to(logits.dtype)], 1)

    def refit(self, d: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The calibrated stop log-odds d' = a d + w . x + b, (B, 1), from d (B, 1) and the
        features x (B, 3 or 5: the two reads of an earlier exit are 0 where there is none)."""
        dx = d if x is None else torch.cat([d, x], 1)  # (B, 1 + F)
        return F.linear(dx, self.calibration[None, :dx.shape[1]], self.calibration[-1:])

    def branch_tokens(self, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        tokens = self.sig_proj(signatures)  # (K_s, d)
        if stop:
            tokens = torch.cat([tokens, self.stop_token[None]], 0)  # (K, d), stop last
        return tokens

    def score(self, embedding: torch.Tensor, signatures, stop: bool) -> torch.Tensor:
        """Scaled dot product of a per-sample embedding (B, d) with each branch token -> (B, K)."""
        return embedding @ self.branch_tokens(signatures, stop).T / math.sqrt(self.d_model)


class TransformerSelector(Selector):
    """§4.1: a small TransformerEncoderLayer over [feature token || branch tokens]."""

    def __init__(self, channels, sig_dim, d_model=64, n_head=4, exit_confidence=True):
        super().__init__(channels, sig_dim, d_model, exit_confidence)
        self.feature = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, d_model))
        # dropout 0: routing is a discrete decision; noise would make top-1 non-deterministic
        self.encoder = nn.TransformerEncoderLayer(d_model, n_head, dim_feedforward=2 * d_model,
                                                  dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, 1)

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        feat = self.feature(f.mean((2, 3)))  # (B, d)
        branches = self.branch_tokens(signatures, stop)  # (K, d)
        tokens = torch.cat([feat[:, None], branches.expand(f.shape[0], -1, -1)], 1)  # (B, 1+K, d)
        out = self.encoder(tokens)  # (B, 1+K, d)
        return self.head(out[:, 1:]).squeeze(-1)  # (B, K)


class MLPSelector(Selector):
    """§5.3's ablation: a 2-layer MLP on GAP(f), scored against the branch tokens."""

    def __init__(self, channels, sig_dim, d_model=64, n_head=4, exit_confidence=True):
        super().__init__(channels, sig_dim, d_model, exit_confidence)
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, d_model), nn.ReLU(),
                                 nn.Linear(d_model, d_model))

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        return self.score(self.mlp(f.mean((2, 3))), signatures, stop)  # (B, K)


class ConvSelector(Selector):
    """§5.3's ablation: a depthwise 3x3 conv + GAP, scored against the branch tokens."""

    def __init__(self, channels, sig_dim, d_model=64, n_head=4, exit_confidence=True):
        super().__init__(channels, sig_dim, d_model, exit_confidence)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.proj = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, d_model))

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        pooled = F.relu(self.dw(f)).mean((2, 3))  # (B, C)
        return self.score(self.proj(pooled), signatures, stop)  # (B, K)


class ConfidenceSelector(Selector):
    """Ours, where the only choice is stop or go on (`JulietNet(stop_go="confidence")`): P_stop =
    sigmoid(b + w . confidence_features(exit)), a learned confidence exit (Shallow-Deep Networks),
    with no transformer to pay per call; calibrated, its stop log-odds d' = a d + w' .
    calibration_features + b' as any selector's. The same arithmetic as `Selector.forward` on the
    logits [0, d], without the generic path's ops: a decision per node is what batch-1 latency
    pays for."""

    def __init__(self, channels, sig_dim, d_model=64, n_head=4, exit_confidence=True):
        super().__init__(channels, 0, d_model, exit_confidence=True)

    def forward(self, f, signatures, stop: bool, exit_logits=None, prev_logits=None):
        prev = prev_logits if self.calibrated else None  # only the calibration reads it
        x = confidence_features(exit_logits, prev)  # (B, 3), calibrated after the root (B, 5)
        b = self.confidence.bias + self.stop_bias
        d = F.linear(x[:, :3], self.confidence.weight, b)  # (B, 1) the stop log-odds
        if self.calibrated:
            d = self.refit(d, x)
        return F.pad(d, (1, 0))  # (B, 2): go on (0), stop (d)


SELECTORS = {"transformer": TransformerSelector, "mlp": MLPSelector, "conv": ConvSelector}
STOP_GO = ("confidence", "selector")  # how a stop-or-go node decides: ours, or as any node
KINDS = {**SELECTORS, "confidence": ConfidenceSelector}


def make_selector(name: str, channels: int, sig_dim: int, d_model=64, n_head=4,
                  exit_confidence=True) -> Selector:
    if name not in KINDS:
        raise ValueError(f"unknown selector {name!r}; choose one of: {', '.join(SELECTORS)}")
    return KINDS[name](channels, sig_dim, d_model, n_head, exit_confidence)


# ----------------------------------------------------------------------------- the decision


class Choice(NamedTuple):
    """Alg. 1 line 5 on one node's sub-batch."""

    run: torch.Tensor  # (B_n,) the branch each sample runs
    top1: torch.Tensor  # (B_n,) the branch the decision picks (run differs in full-depth training)
    q: torch.Tensor  # (B_n,) the probability of what runs: the straight-through gate's value
    P: torch.Tensor  # (B_n, K) Eq. 1, the stop branch last


def stops(p_stop: torch.Tensor, p_stage: torch.Tensor | None, t: float | None) -> torch.Tensor:
    """The stop rule, wherever it is applied (routing, training, the exit tables): with a threshold
    t, stop where P_stop >= t (t >= 1: never; the "half" rule is t = 1/2); without one, Alg. 1's
    argmax: stop where P_stop beats the best stage branch's P (`p_stage`)."""
    if t is None:
        return p_stop > p_stage
    return p_stop >= t if t < 1 else torch.zeros_like(p_stop, dtype=torch.bool)


def decide(logits, has_stop: bool, t: float | None, gumbel_tau=None, full=False,
           lean=False) -> Choice:
    """Alg. 1 line 5. Without a threshold: top-1 over every branch, or in training with policy
    "gumbel" (`gumbel_tau`) a hard Gumbel-softmax sample. With one (the knob; 1/2 under the "half"
    rule): stop where P_stop >= t, else the best stage branch. In full-depth training (`full`) a
    stage branch runs whatever the decision says. `lean` (inference, nothing recorded, no
    gradient): `run` alone, the same, in a few ops."""
    P = logits.float().softmax(-1)  # Eq. 1: (B_n, K)
    n_stage = P.shape[1] - has_stop
    staged = has_stop and t is not None  # stop or go, then a stage branch
    if lean and not staged:
        return Choice(P.argmax(-1), None, None, None)
    if lean:
        stop = stops(P[:, -1], None, t)  # (B_n,); then the best stage branch, or the only one
        if n_stage == 1:
            return Choice(stop.long(), None, None, None)
        go = logits[:, :n_stage].float().softmax(-1).argmax(-1)
        return Choice(torch.where(stop, n_stage, go), None, None, None)
    scope = logits[:, :n_stage] if (full or staged) else logits  # the branches that may run
    if gumbel_tau is not None:
        y = F.gumbel_softmax(scope.float(), tau=gumbel_tau)  # (B_n, K') a relaxed sample
    else:
        y = scope.float().softmax(-1)
    run = y.argmax(-1)  # (B_n,)
    q = y.gather(1, run[:, None]).squeeze(1)
    top1 = P.argmax(-1)  # the decision, whatever runs
    if staged:
        stop = stops(P[:, -1], None, t)
        top1 = torch.where(stop, n_stage, run)
        if not full:  # the decision runs; its probability is P_stop, or (1 - P_stop) q
            run, q = top1, torch.where(stop, P[:, -1], (1 - P[:, -1]) * q)
    return Choice(run, top1, q, P)


def run_sub(sub: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """sub(x), except that a lone training sample (routing makes sub-batches of one) is normalised
    with BatchNorm's running statistics: batch statistics of one value per channel are undefined."""
    if not (training and x.shape[0] == 1):
        return sub(x)
    norms = [m for m in sub.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = [m.eval() for m in norms if m.training]
    try:
        return sub(x)
    finally:
        for m in bns:
            m.train()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass (exactly), g times its gradient in the backward pass."""
    return x if g == 1.0 else x.detach() if g == 0.0 else x.detach() + g * (x - x.detach())


def straight_through(gate: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The path's gate times 1 + (q - sg(q)): exactly the gate forward, dq backward (q = P_i*)."""
    return gate * (1.0 + (q - q.detach()))


# ----------------------------------------------------------------------------- what routing did


class Rows(NamedTuple):
    """What travels with a sub-batch's samples down the trie."""

    idx: torch.Tensor  # (B_n,) each sample's index in the batch
    gate: torch.Tensor | None  # (B_n,) the straight-through gates on its path, multiplied (grad)
    alive: torch.Tensor | None  # (B_n,) bool, in training: top-1 sends it here (full depth runs on)
    prev: torch.Tensor | None  # (B_n, classes) the last exit on its path (the calibration reads it)


class Routed(NamedTuple):
    """One routing node's decision on its sub-batch, as the losses and the exit tables read it."""

    node: "TrieNode"
    idx: torch.Tensor  # (B_n,) batch indices of its samples
    P: torch.Tensor  # (B_n, K) Eq. 1 over its branches, the stop branch last
    exit: torch.Tensor | None  # (B_n, classes) its exit's logits, where it has a stop branch
    sides: list | None  # per stage branch, 1 where its split prior sends a sample (B_n,), or None


class Record(NamedTuple):
    """What one forward pass did (`return_record=True`). DDP finds every tensor in it."""

    routed: list  # Routed, pre-order: in training and whenever a record is asked for
    stopped: list  # (stop branch id, (B_n,) bool: top-1 stopped the sample there), in training
    input_shape: tuple  # (B, (H, W))
    leaf_depth: torch.Tensor | None = None  # (B,) depth of the leaf each sample ran to, in training
    leaf_counts: dict | None = None  # leaf id -> samples top-1 sent there (Alg. 2: the busiest)
    ran_leaf_counts: dict | None = None  # leaf id -> samples that ran there (full depth runs on)


def partition(choice: torch.Tensor | None, n: int, f: torch.Tensor, rows: "Rows") -> list:
    """Alg. 1 line 7, batched: (branch index, its samples' features, their rows) for each of the
    `n` branches chosen, in order (choice None: one branch takes all). One sort and one gather per
    tensor; where every sample chose one branch, its sub-batch is the batch. One host sync."""
    counts = [len(f)] if choice is None else torch.bincount(choice, minlength=n).tolist()
    if max(counts) == len(f):
        return [(counts.index(len(f)), f, rows)]
    order = torch.argsort(choice, stable=True)  # (B_n,)
    parts = [None if v is None else v.index_select(0, order).split(counts) for v in (f, *rows)]
    return [(k, parts[0][k], Rows(*(None if p is None else p[k] for p in parts[1:])))
            for k in range(n) if counts[k]]  # K x (B_k, ...)
