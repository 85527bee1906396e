"""Tests of the model zoo: interface, parameter counts, RepDistiller state-dict/logit parity."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

from cocord_fast.errors import UserError
from cocord_fast.models import MODELS, build_model

FIXTURE = Path(__file__).parent / "fixtures" / "repdistiller" / "golden.json.gz"
CIFAR_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
]
IMAGENET_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101"]


def deterministic_fill(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reproducible, well-scaled value for every state-dict entry (also used to make the fixture).

    Keys are visited in sorted order and all draws come from one generator seeded 0, so the
    result depends only on the key names and shapes.
    """
    g = torch.Generator().manual_seed(0)
    filled = {}
    for key in sorted(state):
        t, leaf = state[key], key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            v = torch.zeros_like(t)
        elif leaf == "running_var":
            v = 0.5 + torch.rand(t.shape, generator=g)
        elif leaf in ("running_mean", "bias"):
            v = 0.1 * torch.randn(t.shape, generator=g)
        elif leaf == "weight" and t.dim() >= 2:  # conv / linear
            v = torch.randn(t.shape, generator=g) / math.sqrt(t.numel() / t.shape[0])
        elif leaf == "weight":  # batch norm scale
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            raise KeyError(f"no fill rule for {key}")
        filled[key] = v.to(t.dtype)
    return filled


def golden_input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1 if size == 32 else 2))


# --- 1. interface -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CIFAR_NAMES + IMAGENET_NAMES)
def test_interface(name: str) -> None:
    imagenet = name in IMAGENET_NAMES
    num_classes = 1000 if imagenet else 100
    model = build_model(name, num_classes).eval()
    assert isinstance(model.num_features, int)
    # CIFAR models must also run off their native 32x32 (global pooling), ImageNet ones at 64.
    for size in (64,) if imagenet else (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits = model(x)
            features = model.forward_features(x)
            via_head = model.forward_head(features)
        assert logits.shape == (2, num_classes)
        assert features.shape == (2, model.num_features)
        torch.testing.assert_close(logits, via_head, rtol=0, atol=0)


def test_registry_names() -> None:
    assert sorted(MODELS) == sorted(CIFAR_NAMES + IMAGENET_NAMES)


def test_unknown_name() -> None:
    with pytest.raises(UserError) as info:
        build_model("nope", 100)
    message = str(info.value)
    assert "'nope'" in message
    for name in MODELS:
        assert name in message


# --- 2. parameter counts from the architecture formulas ----------------------------------

def conv(k: int, cin: int, cout: int, groups: int = 1, bias: bool = False) -> int:
    return k * k * (cin // groups) * cout + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def linear(i: int, o: int) -> int:
    return i * o + o


def count_cifar_resnet(depth: int, widths: tuple[int, ...], nc: int) -> int:
    n, total, cin = (depth - 2) // 6, conv(3, 3, widths[0]) + bn(widths[0]), widths[0]
    for s, w in enumerate(widths[1:]):
        for i in range(n):
            stride = 2 if s > 0 and i == 0 else 1
            total += conv(3, cin, w) + conv(3, w, w) + 2 * bn(w)
            if stride != 1 or cin != w:
                total += conv(1, cin, w) + bn(w)
            cin = w
    return total + linear(widths[3], nc)


def count_bottleneck_resnet(stem_k: int, blocks: tuple[int, ...], nc: int) -> int:
    total, cin = conv(stem_k, 3, 64) + bn(64), 64
    for p, n in zip((64, 128, 256, 512), blocks):
        for i in range(n):
            total += conv(1, cin, p) + bn(p) + conv(3, p, p) + bn(p) + conv(1, p, 4 * p) + bn(4 * p)
            if i == 0:  # stride 2 or width change: projection shortcut
                total += conv(1, cin, 4 * p) + bn(4 * p)
            cin = 4 * p
    return total + linear(2048, nc)


def count_basic_imagenet(blocks: tuple[int, ...], nc: int) -> int:
    total, cin = conv(7, 3, 64) + bn(64), 64
    for s, (p, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(n):
            total += conv(3, cin, p) + conv(3, p, p) + 2 * bn(p)
            if i == 0 and s > 0:
                total += conv(1, cin, p) + bn(p)
            cin = p
    return total + linear(512, nc)


def count_wrn(depth: int, k: int, nc: int) -> int:
    n, total, cin = (depth - 4) // 6, conv(3, 3, 16), 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + conv(3, cin, w) + bn(w) + conv(3, w, w)
            if cin != w:
                total += conv(1, cin, w)
            cin = w
    return total + bn(64 * k) + linear(64 * k, nc)


VGG_CONVS = {
    "vgg8": [64, 128, 256, 512, 512],
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128] + [256] * 4 + [512] * 8,
}


def count_vgg(name: str, nc: int) -> int:
    total, cin = 0, 3
    for w in VGG_CONVS[name]:
        total += conv(3, cin, w, bias=True) + bn(w)
        cin = w
    return total + linear(512, nc)


def count_mobilenetv2_half(nc: int) -> int:
    # width 0.5: stem 16; stages (expansion, out, blocks) with halved widths; head 1280
    total, cin = conv(3, 3, 16) + bn(16), 16
    for t, c, n in ((1, 8, 1), (6, 12, 2), (6, 16, 3), (6, 32, 4), (6, 48, 3), (6, 80, 3), (6, 160, 1)):
        for _ in range(n):
            h = cin * t
            total += conv(1, cin, h) + bn(h) + conv(3, h, h, groups=h) + bn(h) + conv(1, h, c) + bn(c)
            cin = c
    return total + conv(1, 160, 1280) + bn(1280) + linear(1280, nc)


def count_shufflev1(nc: int) -> int:
    total, cin = conv(1, 3, 24) + bn(24), 24
    for width, n in ((240, 4), (480, 8), (960, 4)):
        for i in range(n):
            out = width - cin if i == 0 else width
            mid, g1 = out // 4, (1 if cin == 24 else 3)
            total += conv(1, cin, mid, g1) + bn(mid) + conv(3, mid, mid, mid) + bn(mid)
            total += conv(1, mid, out, 3) + bn(out)
            cin = width
    return total + linear(960, nc)


def count_shufflev2(nc: int) -> int:
    total, cin = conv(1, 3, 24) + bn(24), 24
    for width, n in ((116, 3), (232, 7), (464, 3)):
        m = width // 2
        total += conv(3, cin, cin, cin) + bn(cin) + conv(1, cin, m) + bn(m)  # down, left
        total += conv(1, cin, m) + bn(m) + conv(3, m, m, m) + bn(m) + conv(1, m, m) + bn(m)  # right
        total += n * (2 * conv(1, m, m) + conv(3, m, m, m) + 3 * bn(m))
        cin = width
    return total + conv(1, 464, 1024) + bn(1024) + linear(1024, nc)


SLIM, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
EXPECTED_PARAMS = {
    **{f"resnet{d}": (lambda nc, d=d: count_cifar_resnet(d, SLIM, nc)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda nc: count_cifar_resnet(8, WIDE, nc),
    "resnet32x4": lambda nc: count_cifar_resnet(32, WIDE, nc),
    "ResNet50": lambda nc: count_bottleneck_resnet(3, (3, 4, 6, 3), nc),
    **{f"wrn_{d}_{k}": (lambda nc, d=d, k=k: count_wrn(d, k, nc)) for d in (16, 40) for k in (1, 2)},
    **{v: (lambda nc, v=v: count_vgg(v, nc)) for v in VGG_CONVS},
    "MobileNetV2": count_mobilenetv2_half,
    "ShuffleV1": count_shufflev1,
    "ShuffleV2": count_shufflev2,
    "resnet18": lambda nc: count_basic_imagenet((2, 2, 2, 2), nc),
    "resnet34": lambda nc: count_basic_imagenet((3, 4, 6, 3), nc),
    "resnet50": lambda nc: count_bottleneck_resnet(7, (3, 4, 6, 3), nc),
    "resnet101": lambda nc: count_bottleneck_resnet(7, (3, 4, 23, 3), nc),
}


def test_count_formulas_match_published_torchvision_sizes() -> None:
    # Published parameter counts of torchvision's ImageNet ResNets: checks the formulas above.
    published = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160}
    for name, n in published.items():
        assert EXPECTED_PARAMS[name](1000) == n, name


@pytest.mark.parametrize("name", CIFAR_NAMES + IMAGENET_NAMES)
def test_parameter_count(name: str) -> None:
    nc = 1000 if name in IMAGENET_NAMES else 100
    model = build_model(name, nc)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name](nc)


# --- 3. RepDistiller parity (golden fixture made by running RepDistiller's own code) --------

@pytest.fixture(scope="module")
def golden() -> dict:
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 sums in a different order (global mean vs fixed-kernel average pooling) differ
    # by a few ulps of the largest activations, so the tolerance is relative to the logit scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_repdistiller_parity(name: str, golden: dict) -> None:
    ref = golden["models"][name]
    model = build_model(name, golden["num_classes"]).eval()
    state = model.state_dict()
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}
    assert ours == ref["state"]
    model.load_state_dict(deterministic_fill(state), strict=True)
    with torch.no_grad():
        _assert_logits_close(model(golden_input(32)), torch.tensor(ref["logits_32"]))
        if "logits_64" in ref:  # recorded where RepDistiller's model runs at 64x64
            _assert_logits_close(model(golden_input(64)), torch.tensor(ref["logits_64"]))


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_torchvision_parity(name: str) -> None:
    """The ImageNet ResNets are torchvision's: same state-dict names, same outputs."""
    model = build_model(name, 1000).eval()
    reference = getattr(torchvision.models, name)(weights=None).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = golden_input(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_fill_changes_outputs(golden: dict) -> None:
    """Guard against a vacuous parity test: the fixture's logits are not all alike."""
    logits = torch.tensor(golden["models"]["resnet8"]["logits_32"])
    assert logits.std() > 0.1 and not torch.allclose(logits[0], logits[1])
