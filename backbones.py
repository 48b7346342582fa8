"""Backbones for Juliet: torchvision CNNs cut into a stem and an ordered list of stages.

Paper §5.1 ("Backbones") and §5.3 ("Initialisation across backbones").
A trie node at depth d runs a fresh copy of stage d (the root runs the stem), so a backbone here is
just: how to cut a torchvision model into stages, how many channels each stage emits, and a factory
that builds a freshly initialised copy of any stage for growth (Alg. 2 line 3, "initialise child
weights freshly").

    stages    resnet18 / resnet101             densenet121                efficientnet_b0
    0 (root)  conv1, bn1, relu, maxpool        conv0 .. pool0             features[0]
    1..       layer1 .. layer4                 denseblock_k+transition_k  features[1:3], [3],
              (resnet101: layer3 in 6 chunks)  denseblock4+norm5+relu     [4:6], [6:9]

The stage modules are torchvision's own, unmodified, so `static_model` reproduces the paper's
Table 4 baselines (THOP at 1x3x32x32, 10 classes): ResNet-18 37.22 M MACs / 11.18 M params,
DenseNet-121 59.11 M / 6.96 M.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision.models as tvm
from torch.utils.flop_counter import FlopCounterMode

# ----------------------------------------------------------------------------- helpers


class MaxPool2d(nn.MaxPool2d):
    """The stems' max-pool, run in channels_last on CPU: the same values, 3-5x faster there (torch
    2.14's NCHW kernel: 26 ms for ResNet-18's (128, 64, 16, 16) activations, 5 ms this way, the
    layout round trip included). The static model and the trie's root run it alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _fast_pool(model: nn.Module) -> nn.Module:
    """`model` with its stem's max-pool (ResNet's maxpool, DenseNet's pool0) as `MaxPool2d`."""
    for parent, name in ((model, "maxpool"), (getattr(model, "features", None), "pool0")):
        old = getattr(parent, name, None)
        if isinstance(old, nn.MaxPool2d):
            setattr(parent, name, MaxPool2d(old.kernel_size, old.stride, old.padding))
    return model


def _resnet_stages(model: nn.Module, layer3_chunks: int = 1) -> list[nn.Module]:
    """stem, layer1, layer2, layer3 (optionally cut into chunks), layer4."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = list(model.layer3)
    # ResNet-101's layer3 has 23 blocks; cut it so a prebuild of 10 nodes is a chain (§5.3).
    bounds = torch.linspace(0, len(blocks), layer3_chunks + 1).round().long().tolist()
    layer3 = [nn.Sequential(*blocks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [stem, model.layer1, model.layer2, *layer3, model.layer4]


def _densenet_stages(model: nn.Module) -> list[nn.Module]:
    """stem, (denseblock_k + transition_k) for k=1..3, denseblock4 + norm5 + ReLU."""
    f = model.features
    stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
    mids = [nn.Sequential(getattr(f, f"denseblock{k}"), getattr(f, f"transition{k}"))
            for k in (1, 2, 3)]
    # DenseNet.forward applies F.relu after norm5: here it is a module of the last stage.
    last = nn.Sequential(f.denseblock4, f.norm5, nn.ReLU(inplace=True))
    return [stem, *mids, last]


def _efficientnet_stages(model: nn.Module) -> list[nn.Module]:
    """stem, then the MBConv stages in 4 nodes, one per output resolution (/4, /8, /16, /32)."""
    f = model.features
    return [f[0], nn.Sequential(f[1], f[2]), f[3], nn.Sequential(f[4], f[5]),
            nn.Sequential(f[6], f[7], f[8])]


# ----------------------------------------------------------------------------- the backbone


@dataclass
class Stage:
    make: Callable[[], nn.Module]  # builds a freshly initialised copy (torchvision's init)
    channels: int                  # output channels
    sig_name: str                  # last Conv2d in the stage: its weights give the branch token
    sig_dim: int                   # that conv's output channels


@dataclass
class Backbone:
    """A torchvision model cut into stages. `stages[0]` is the stem (the trie's root)."""

    name: str
    num_classes: int
    stages: list[Stage]
    build: Callable[[], nn.Module]            # the whole torchvision model, freshly initialised
    cut: Callable[[nn.Module], list[nn.Module]]  # a model -> its stage modules
    head_of: Callable[[nn.Module], nn.Module]
    in_channels: int = 3
    macs: dict = field(default_factory=dict, repr=False)  # stage_macs' counts by input size

    @property
    def head_width(self) -> int:
        """Channels the classifier reads: the last stage's (other leaves via adapters, §4.1)."""
        return self.stages[-1].channels

    def initial(self, model: nn.Module | None = None) -> tuple[list[nn.Module], nn.Module]:
        """Stage modules and head of one model: a fresh one (one constructor call for the whole
        prebuilt chain, not one per stage), or deep copies of `model`'s, e.g. a trained static
        baseline."""
        model = self.build() if model is None else copy.deepcopy(model)
        return self.cut(model), self.head_of(model)

    def stage_macs(self, hw: tuple[int, int]) -> list[float]:
        """MACs of each stage at input size `hw` (FlopCounterMode's FLOPs / 2), counted once: the
        stage costs the routing losses price (losses.py)."""
        if hw not in self.macs:
            with torch.random.fork_rng(devices=[]):  # fresh modules draw weights: not ours to take
                stages, _ = self.initial()
            x, macs = torch.zeros(1, self.in_channels, *hw), []
            with torch.no_grad():
                for s in stages:
                    with FlopCounterMode(display=False) as counter:
                        x = s.eval()(x)
                    macs.append(counter.get_total_flops() / 2)
            self.macs[hw] = macs
        return self.macs[hw]


# (constructor, cut into stages, head); DenseNet's classifier is a Linear, EfficientNet's a
# Sequential(Dropout, Linear)
_SPECS = {
    "resnet18": (tvm.resnet18, _resnet_stages, lambda m: m.fc),
    "resnet101": (tvm.resnet101, lambda m: _resnet_stages(m, layer3_chunks=6), lambda m: m.fc),
    "densenet121": (tvm.densenet121, _densenet_stages, lambda m: m.classifier),
    "efficientnet_b0": (tvm.efficientnet_b0, _efficientnet_stages, lambda m: m.classifier),
}
BACKBONES = tuple(_SPECS)


def _check_name(name: str) -> None:
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")


def static_model(name: str, num_classes: int = 10) -> nn.Module:
    """The plain torchvision model with a `num_classes` head: the static baseline of Table 4."""
    _check_name(name)
    return _fast_pool(_SPECS[name][0](num_classes=num_classes))


@torch.no_grad()
def make_backbone(name: str, num_classes: int = 10) -> Backbone:
    """Cut torchvision's `name` into stages; channel counts come from one dummy forward pass."""
    _check_name(name)
    ctor, cut, head_of = _SPECS[name]
    build = lambda: _fast_pool(ctor(num_classes=num_classes))  # noqa: E731
    modules = cut(build().eval())
    x = torch.zeros(1, 3, 64, 64)
    stages = []
    for i, module in enumerate(modules):
        x = module(x)  # (1, C_i, H_i, W_i)
        # the last Conv2d of the stage: the weight signature the selectors read (§4.1)
        sig = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)][-1]
        sig_dim = module.get_submodule(sig).out_channels
        stages.append(Stage(make=lambda i=i: cut(build())[i], channels=x.shape[1], sig_name=sig,
                            sig_dim=sig_dim))
    return Backbone(name, num_classes, stages, build, cut, head_of)

