"""Path selectors: score a node's candidate children from the node's features (paper §3.1.2, §4.1, §5.3).

Every selector has one interface, `selector(f, signatures, stop, exit_logits=None, prev_logits=None) -> (B, K)`:

  f            (B, C, H, W)   the node's post-sub-module activations
  signatures   (K_s, S)       one weight signature per stage child: the mean of its last conv's weights
                              over (C_in, kH, kW), detached -- "a compact weight signature from the
                              child's sub-module (e.g., averaging a representative convolution's weights)"
  stop         bool           whether the node has a stop child (trie.py); it gets a learned token
  exit_logits  (B, classes)   the prediction a sample would leave with if it stopped here (optional)
  prev_logits  (B, classes)   the exit before it on the sample's path (NaN rows: none; read by the calibration)

The stop child's logit also gets a learned offset, `stop_bias`. Initialised negative, it makes a new
trie behave like its backbone (every sample runs every stage, so every stage gets trained) and lets
exits be learned, rather than letting an untrained selector send whole batches to a stop leaf.

Exit confidence (ours; README "Paper notes and deviations"). Whether to stop is whether the exit is
already right, and the best-known witness of that is the exit's own confidence (Shallow-Deep Networks,
MSDNet). The paper's feature token cannot see it: its LayerNorm removes the scale of GAP(f), and with it
the size of the exit's logits. With `exit_confidence`, the stop logit adds a learned linear function
(zero at initialisation: the paper's selector) of the exit's max softmax, top-2 margin and normalised
entropy, so a learned stop is never worse informed than a confidence threshold.

Each child becomes a *branch token* (LayerNorm + Linear of its signature, or the stop token), so a
selector handles any number of children, and a child grown later (Alg. 2) is scored from the first
step without resizing anything. The three selectors differ only in how they read `f`:

  transformer  §4.1: feature token Linear(LayerNorm(GAP(f))); TransformerEncoderLayer over
               [feature || branches]; a linear head on each branch output gives its logit.
  mlp          §5.3: a 2-layer MLP embeds GAP(f); logit = <embedding, branch token> / sqrt(d).
  conv         §5.3: depthwise 3x3 conv + ReLU + GAP, projected, scored like `mlp`.

The decision from a selector's logits (Eq. 1, Alg. 1 line 5): `choose` in training (top-1 or Gumbel, the gate
value, what full-depth training runs), `decide` at inference (the same choice in fewer ops), and `stops`, the
stop rule itself, which the exit tables (exits.py) apply too.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def confidence_features(exit_logits: torch.Tensor) -> torch.Tensor:
    """(B, classes) -> (B, 3): max softmax, top-2 margin and entropy / log(classes) of an exit's prediction."""
    p = exit_logits.float().softmax(-1)  # (B, classes)
    top2 = p.topk(min(2, p.shape[1]), dim=-1).values  # (B, 2)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(max(2, p.shape[1]))  # (B,)
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, -1], entropy], -1)


IDENTITY = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # [a, w_1..w_5, b]: the calibration that changes nothing


def calibration_features(exit_logits: torch.Tensor, prev_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 5): confidence_features and two reads of the exit before it on the path (0 where there is none): whether
    it predicted the same class, and its probability of this exit's class (consecutive exits that agree are
    rarely wrong together; PABEE's "patience")."""
    conf = confidence_features(exit_logits)  # (B, 3)
    if prev_logits is None:
        return torch.cat([conf, conf.new_zeros(len(conf), 2)], 1)
    pred = exit_logits.argmax(-1, keepdim=True)  # (B, 1)
    prev = prev_logits.float().softmax(-1).nan_to_num(0.0)  # (B, classes); NaN rows (no exit before) -> 0
    agree = (prev.argmax(-1, keepdim=True) == pred) & (prev.sum(-1, keepdim=True) > 0)  # (B, 1)
    return torch.cat([conf, agree.float(), prev.gather(1, pred)], 1)


class Selector(nn.Module):
    """Shared part: branch tokens from child weight signatures, a learned stop token, the stop logit's offset
    and, with `exit_confidence`, its read of the exit's confidence."""

    def __init__(self, channels: int, sig_dim: int, d_model: int, stop_bias: float = 0.0,
                 exit_confidence: bool = False):
        super().__init__()
        self.d_model = d_model
        self.sig_proj = nn.Sequential(nn.LayerNorm(sig_dim), nn.Linear(sig_dim, d_model))
        self.stop_token = nn.Parameter(0.02 * torch.randn(d_model))
        self.stop_bias = nn.Parameter(torch.tensor(float(stop_bias)))
        self.confidence = nn.Linear(3, 1) if exit_confidence else None
        if self.confidence is not None:  # zero: a new selector is the paper's
            nn.init.zeros_(self.confidence.weight), nn.init.zeros_(self.confidence.bias)
        # Held-out calibration of the stop decision (ours; exits.calibrate fits it on the validation split):
        # stop log-odds d' = a d + w . calibration_features + b, as [a, w_1, ..., w_5, b]. Not learned by SGD.
        self.register_buffer("calibration", IDENTITY.clone())
        self.calibrated = False  # whether `calibration` is not the identity (a flag: no device sync per call)

    def set_calibration(self, coefficients: torch.Tensor) -> None:
        self.calibration.copy_(coefficients)
        self.calibrated = not torch.equal(self.calibration.cpu(), IDENTITY)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.calibrated = not torch.equal(self.calibration.cpu(), IDENTITY)  # a loaded fit is in use

    def forward(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool,
                exit_logits: torch.Tensor | None = None, prev_logits: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(f, signatures, stop)  # (B, K)
        if stop:  # the stop child is last
            offset = self.stop_bias
            if self.confidence is not None and exit_logits is not None:
                offset = offset + self.confidence(confidence_features(exit_logits)).to(logits.dtype)  # (B, 1)
            logits = torch.cat([logits[:, :-1], logits[:, -1:] + offset], 1)
            if self.calibrated:
                logits = self.calibrate(logits, exit_logits, prev_logits)
        return logits

    def calibrate(self, logits: torch.Tensor, exit_logits: torch.Tensor | None,
                  prev_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Replace P_stop by sigmoid(d'), d' = a d + w . calibration_features + b, d = log P_stop / (1 - P_stop) =
        the stop logit minus the stage logits' logsumexp; the stage children keep their odds among themselves."""
        a, w, b = self.calibration[0], self.calibration[1:-1], self.calibration[-1]
        go = logits[:, :-1].float().logsumexp(-1)  # (B,)
        d = a * (logits[:, -1].float() - go) + b
        if exit_logits is not None:
            d = d + calibration_features(exit_logits, prev_logits) @ w
        return torch.cat([logits[:, :-1], (d + go)[:, None].to(logits.dtype)], 1)

    def branch_tokens(self, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        tokens = self.sig_proj(signatures)  # (K_s, d)
        if stop:
            tokens = torch.cat([tokens, self.stop_token[None]], 0)  # (K, d), stop child last
        return tokens

    def score(self, embedding: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        """Scaled dot product of a per-sample embedding (B, d) with each branch token -> (B, K)."""
        return embedding @ self.branch_tokens(signatures, stop).T / math.sqrt(self.d_model)


class TransformerSelector(Selector):
    """§4.1: a small TransformerEncoderLayer over [feature token || branch tokens]."""

    def __init__(self, channels: int, sig_dim: int, d_model: int = 64, n_head: int = 4, stop_bias: float = 0.0,
                 exit_confidence: bool = False):
        super().__init__(channels, sig_dim, d_model, stop_bias, exit_confidence)
        self.feature = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, d_model))
        # dropout=0: routing is a discrete decision, and noise in it would make top-1 non-deterministic.
        self.encoder = nn.TransformerEncoderLayer(
            d_model, n_head, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, 1)

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        feat = self.feature(f.mean((2, 3)))  # (B, d)
        branches = self.branch_tokens(signatures, stop)  # (K, d)
        tokens = torch.cat([feat[:, None], branches.expand(f.shape[0], -1, -1)], 1)  # (B, 1+K, d)
        out = self.encoder(tokens)  # (B, 1+K, d)
        return self.head(out[:, 1:]).squeeze(-1)  # (B, K)


class MLPSelector(Selector):
    """§5.3 ablation: 2-layer MLP on GAP(f), scored against the branch tokens."""

    def __init__(self, channels: int, sig_dim: int, d_model: int = 64, n_head: int = 4, stop_bias: float = 0.0,
                 exit_confidence: bool = False):
        super().__init__(channels, sig_dim, d_model, stop_bias, exit_confidence)
        self.mlp = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, d_model), nn.ReLU(), nn.Linear(d_model, d_model)
        )

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        return self.score(self.mlp(f.mean((2, 3))), signatures, stop)  # (B, K)


class ConvSelector(Selector):
    """§5.3 ablation: depthwise 3x3 conv + GAP, scored against the branch tokens."""

    def __init__(self, channels: int, sig_dim: int, d_model: int = 64, n_head: int = 4, stop_bias: float = 0.0,
                 exit_confidence: bool = False):
        super().__init__(channels, sig_dim, d_model, stop_bias, exit_confidence)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.proj = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, d_model))

    def logits(self, f: torch.Tensor, signatures: torch.Tensor, stop: bool) -> torch.Tensor:
        pooled = F.relu(self.dw(f)).mean((2, 3))  # (B, C)
        return self.score(self.proj(pooled), signatures, stop)  # (B, K)


SELECTORS = {"transformer": TransformerSelector, "mlp": MLPSelector, "conv": ConvSelector}


def make_selector(name: str, channels: int, sig_dim: int, d_model: int = 64, n_head: int = 4,
                  stop_bias: float = 0.0, exit_confidence: bool = False) -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose one of: {', '.join(SELECTORS)}")
    return SELECTORS[name](channels, sig_dim, d_model, n_head, stop_bias, exit_confidence)


# ----------------------------------------------------------------------------- the decision (Alg. 1 line 5)

STOP_RULES = {"half": 0.5, "argmax": None}  # stop rule -> the stop threshold it is (None: Alg. 1 argmax)
STOP = "stop"  # local id of a node's stop child (trie.py), the last of a node's choices


def stops(p_stop: torch.Tensor, p_stage: torch.Tensor | None, t: float | None) -> torch.Tensor:
    """The stop rule, everywhere it is applied (routing, training, the exit tables): with a threshold t, stop where
    P_stop >= t (t >= 1: never; the "half" rule is t = 1/2); without one, Alg. 1's argmax: stop where P_stop beats
    the best stage child's P (`p_stage`)."""
    return p_stop > p_stage if t is None else (p_stop >= t) & bool(t < 1)


def decide(logits: torch.Tensor, has_stop: bool, t: float | None) -> torch.Tensor:
    """The child each sample runs at inference: `choose`'s first output outside training, in fewer ops."""
    if not has_stop or t is None:
        return logits.argmax(-1)  # Alg. 1 line 5 (`stops` with t None, without the softmax)
    best = logits[:, :-1].argmax(-1)  # the best stage child, given "go"
    if t >= 1:
        return best
    return torch.where(stops(logits.float().softmax(-1)[:, -1], None, t), logits.shape[1] - 1, best)


def choose(logits: torch.Tensor, has_stop: bool, t: float | None, gumbel_tau: float | None, full: bool):
    """(child that runs, top-1 child, its gate value q, P) for one routing node's sub-batch.

    Without a threshold: top-1 over all children (Alg. 1 line 5) or, in training with policy "gumbel" (`gumbel_tau`
    set), a hard Gumbel-softmax sample. With a threshold t (the knob; 1/2 under the "half" stop rule): stop where
    P_stop >= t (t = 1: never), else the best stage child; P_j = (1 - P_stop) softmax(stage)_j exactly. In
    full-depth training (`full`) a stage child runs whatever the decision (`top1`) says."""
    P = logits.float().softmax(-1)  # Eq. 1: (B_n, K)
    n_stage = P.shape[1] - has_stop
    staged = has_stop and t is not None  # stop-or-go, then a stage child
    scope = logits[:, :n_stage] if (full or staged) else logits  # the choices that may run
    if gumbel_tau is not None:
        y = F.gumbel_softmax(scope.float(), tau=gumbel_tau)  # (B_n, K') relaxed sample
    else:
        y = scope.float().softmax(-1)
    choice = y.argmax(-1)  # (B_n,)
    q = y.gather(1, choice[:, None]).squeeze(1)
    top1 = P.argmax(-1)  # what the decision is, whatever runs
    if staged:
        stop = stops(P[:, -1], None, t)
        top1 = torch.where(stop, n_stage, choice)
        if not full:  # routed: the decision runs, its gate its probability (P_stop, or (1 - P_stop) q)
            choice, q = top1, torch.where(stop, P[:, -1], (1 - P[:, -1]) * q)
    return choice, top1, q, P
