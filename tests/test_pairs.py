"""Every published CIFAR-100 pair, and pairs of timm and torchvision models across families,
with every distilling method, in float64 on one fixed batch: the loss and each logged term
equal the terms written out from the formulas (tests/formulas.py) on the same networks'
outputs, and the gradient autograd gives is the loss's slope, so one SGD step lowers that
batch's loss."""
import math

import numpy as np
import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.configs.generate import CIFAR_PAIRS
from cocord_fast.data import Batch
from cocord_fast.methods import build_method, method_class
from cocord_fast.models import build_model

from formulas import (formula_ce, formula_ctr, formula_kd, formula_pred, recompute_terms,
                      reference_step)

# Small heads and banks; weights other than the defaults, so that a weight applied to the
# wrong term shows. Every method includes the KD term.
SETTINGS = ["cocord.embed_dim=32", "cocord.proj_hidden_dim=32", "cocord.pred_hidden_dim=16",
            "cocord.queue_size=24", "cocord.loss_cls=0.7", "cocord.loss_ctr=1.3",
            "cocord.loss_pred=2.5", "cocord.loss_kd=0.5", "crd.embed_dim=16",
            "crd.num_negatives=8", "crd.loss_cls=0.7", "crd.loss_crd=1.3", "crd.loss_kd=0.5",
            "kd.loss_cls=0.3", "kd.loss_kd=0.9"]
NUM_DATA, BATCH, CLASSES = 40, 8, 100
# (teacher, student, input size): a ViT teacher (224 px, its patch grid) for a torchvision
# ResNet, and a torchvision ConvNeXt teacher for a timm ResNet.
LIBRARY_PAIRS = [("timm:vit_tiny_patch16_224", "torchvision:resnet18", 224),
                 ("torchvision:convnext_tiny", "timm:resnet18", 32)]


def fixed_batch(num_views: int, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(1)
    index = torch.randperm(NUM_DATA, generator=g)[:BATCH]
    # CIFAR's 32 pixels and 8 samples: smaller inputs leave MobileNetV2 and ShuffleNet a 1x1
    # map normalised over a handful of values, a loss too curved for the slope check below.
    views = [torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64)
             for _ in range(num_views)]
    return Batch(views, torch.randint(0, CLASSES, (BATCH,), generator=g), index)


@torch.no_grad()
def formula_terms(name: str, method, cfg, batch: Batch) -> tuple[dict, torch.Tensor]:
    """Each logged term and the weighted total, from the formulas on the method's networks
    in their state before the step."""
    if name == "cocord":
        c, out = cfg.cocord, recompute_terms(method, batch)
        terms = {"loss_ctr": formula_ctr(out["z"], out["k"], method.queue, c.temperature)[0],
                 "loss_pred": formula_pred(out["p"], out["t"], out["p2"], out["t2"]),
                 "loss_cls": formula_ce(out["logits"], batch.labels),
                 "loss_kd": formula_kd(out["logits"], out["teacher_logits"], c.kd_temperature)}
        weights = {"loss_ctr": c.loss_ctr, "loss_pred": c.loss_pred, "loss_cls": c.loss_cls,
                   "loss_kd": c.loss_kd}
    else:
        x = batch.views[0]
        f_s = method.student_encoder.forward_features(x)
        logits = method.student_encoder.forward_head(f_s)
        teacher_logits = method.teacher_encoder(x)
        c = cfg.crd if name == "crd" else cfg.kd
        temperature = c.kd_temperature if name == "crd" else c.temperature
        terms = {"loss_cls": formula_ce(logits, batch.labels),
                 "loss_kd": formula_kd(logits, teacher_logits, temperature)}
        weights = {"loss_cls": c.loss_cls, "loss_kd": c.loss_kd}
        if name == "crd":
            f_t = method.teacher_encoder.forward_features(x)
            contrast_index = method.negatives.sample(batch.index, method.micro_batch)
            terms["loss_crd"] = torch.tensor(reference_step(
                method.crd, f_s, f_t, batch.index, contrast_index)[0], dtype=torch.float64)
            weights["loss_crd"] = c.loss_crd
    return terms, sum(weights[key] * value for key, value in terms.items())


@pytest.mark.parametrize("teacher_name, student_name", list(CIFAR_PAIRS))
@pytest.mark.parametrize("method_name", ["kd", "crd", "cocord"])
def test_loss_matches_the_formulas_and_its_gradient_is_its_slope(method_name, teacher_name,
                                                                  student_name):
    check_step(method_name, teacher_name, student_name, size=32)


@pytest.mark.parametrize("teacher_name, student_name, size", LIBRARY_PAIRS)
@pytest.mark.parametrize("method_name", ["kd", "crd", "cocord"])
def test_library_pairs_match_the_formulas_and_their_gradient_is_the_slope(
        method_name, teacher_name, student_name, size):
    check_step(method_name, teacher_name, student_name, size)


def check_step(method_name: str, teacher_name: str, student_name: str, size: int) -> None:
    torch.manual_seed(0)
    cfg = load_config(overrides=[*SETTINGS, f"method.name={method_name}"])
    method = build_method(method_name, cfg, build_model(student_name, CLASSES),
                          build_model(teacher_name, CLASSES),
                          np.arange(NUM_DATA) % 4).double().train()
    batch = fixed_batch(method_class(method_name).num_views, size)
    if method_name == "crd":
        method(batch)  # a first step fixes the normalisers, which are constants from then on
    before = {key: value.clone() for key, value in method.state_dict().items()}

    out = method(batch)
    out.loss.backward()
    method.load_state_dict(before)  # queue, banks and BatchNorm statistics as the step saw them
    terms, total = formula_terms(method_name, method, cfg, batch)
    assert {key: value.item() for key, value in out.metrics.items()
            if key.startswith("loss_")} == pytest.approx(
        {key: value.item() for key, value in terms.items()}, rel=1e-9)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-9)

    params = list(method.trainable_module().parameters())
    assert all(p.grad is not None for p in params)  # every trainable tensor is in the loss
    grads = [p.grad.clone() for p in params]
    norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads))

    @torch.no_grad()
    def loss_moved(distance: float) -> float:
        """The step's loss with the parameters moved `distance` along the gradient."""
        method.load_state_dict(before)
        for p, g in zip(params, grads):
            p.add_(g, alpha=distance / norm)
        return method(batch).loss.item()

    # The slope along the gradient (central difference) must be the gradient's norm. In
    # float64 at h = 1e-7, rounding (~1e-15 * loss / h) is below 1e-7 of it and truncation
    # (h^2 * curvature) smaller still; what remains is a ReLU or max-pool changing sides within
    # h, which moved it by at most 2e-4 over these pairs (1e-5 in most). A gradient of the
    # wrong sign or scale, or of another loss, is off by far more.
    h = 1e-7
    assert (loss_moved(h) - loss_moved(-h)) / (2 * h) == pytest.approx(norm, rel=1e-3)
    assert loss_moved(-1e-3) < out.loss.item()  # so an SGD step lowers the batch's loss
