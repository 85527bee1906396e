"""DKD (Zhao et al., CVPR 2022) and DIST (Huang et al., NeurIPS 2022) against their papers'
formulas, written out independently in float64 numpy: the loss terms, DKD's decomposition of
Hinton's KD, gradients, DKD's warm-up, and bf16 logits."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.data import Batch
from cocord_fast.methods.dist import DIST, DISTSettings, dist_relations
from cocord_fast.methods.dkd import DKD, DKDSettings, dkd_terms, warmup_factor


def softmax_rows(z, T):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / T)
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def dkd_reference(zs, zt, labels, T):
    """(TCKD, NCKD): T^2 x the batch mean of KL(b_t || b_s) and KL(p_hat_t || p_hat_s)."""
    ps = softmax_rows(np.asarray(zs, np.float64), T)
    pt = softmax_rows(np.asarray(zt, np.float64), T)
    tckd = nckd = 0.0
    for i, y in enumerate(labels):
        others = [j for j in range(ps.shape[1]) if j != y]
        b_s = np.array([ps[i, y], ps[i, others].sum()])  # 1 - p_target, without cancellation
        b_t = np.array([pt[i, y], pt[i, others].sum()])
        tckd += kl(b_t, b_s)
        nckd += kl(pt[i, others] / b_t[1], ps[i, others] / b_s[1])
    return T * T * tckd / len(labels), T * T * nckd / len(labels)


def hinton_kd(zs, zt, T):
    """T^2 KL(softmax(t/T) || softmax(s/T)) of a single sample (B = 1)."""
    return T * T * kl(softmax_rows(zt, T)[0], softmax_rows(zs, T)[0])


def dist_reference(zs, zt, tau):
    """(inter, intra): tau^2 (1 - mean Pearson) over the rows, then the columns, of the
    softmax(z / tau) matrices, with numpy's exact Pearson correlation."""
    ys = softmax_rows(np.asarray(zs, np.float64), tau)
    yt = softmax_rows(np.asarray(zt, np.float64), tau)
    rows = [np.corrcoef(ys[i], yt[i])[0, 1] for i in range(ys.shape[0])]
    cols = [np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(ys.shape[1])]
    return tau * tau * (1 - np.mean(rows)), tau * tau * (1 - np.mean(cols))


def logits(batch, classes, seed, spread=4.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, classes, generator=g, dtype=dtype) * spread for _ in range(2)] + [
        torch.randint(0, classes, (batch,), generator=g)]


class LinearNet(nn.Module):
    """A tiny float64 encoder: flattened input -> logits."""

    def __init__(self, features, classes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(features, classes, dtype=torch.float64)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 3  # a wide spread of logits


def method_batch(batch=8, features=12, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=g, dtype=torch.float64)
    return Batch(views=[x], labels=torch.randint(0, classes, (batch,), generator=g), index=None)


@pytest.mark.parametrize("B,C,T", [(1, 2, 1.0), (6, 5, 1.0), (8, 10, 4.0), (16, 100, 4.0),
                                   (4, 7, 2.5)])
def test_dkd_terms_match_the_papers_formulas(B, C, T):
    """TCKD and NCKD against explicit binary and non-target probabilities in float64."""
    zs, zt, labels = logits(B, C, seed=B * C)
    tckd, nckd = dkd_terms(zs, zt, labels, T)
    ref_tckd, ref_nckd = dkd_reference(zs.numpy(), zt.numpy(), labels.tolist(), T)
    assert tckd.item() == pytest.approx(ref_tckd, rel=1e-9, abs=1e-12)
    assert nckd.item() == pytest.approx(ref_nckd, rel=1e-9, abs=1e-12)
    if C == 2:  # a single non-target class: its distribution is the certain one
        assert nckd.item() == pytest.approx(0.0, abs=1e-12)
    same_tckd, same_nckd = dkd_terms(zt, zt, labels, T)
    assert same_tckd.item() == pytest.approx(0.0, abs=1e-12)
    assert same_nckd.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_terms_decompose_hintons_kd_per_sample(seed, T):
    """Eq. 5 of the DKD paper: KD = TCKD + (1 - p_target of the teacher) NCKD, one sample."""
    zs, zt, labels = logits(1, 9, seed=100 + seed, spread=3.0)
    tckd, nckd = dkd_terms(zs, zt, labels, T)
    teacher_others = 1 - softmax_rows(zt.numpy(), T)[0, labels.item()]
    kd = hinton_kd(zs.numpy(), zt.numpy(), T)
    assert tckd.item() + teacher_others * nckd.item() == pytest.approx(kd, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_and_dist_gradients_match_finite_differences(T):
    """gradcheck of both losses with respect to the student logits, in float64."""
    zs, zt, labels = logits(5, 6, seed=7, spread=2.0)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: dkd_terms(s, zt, labels, T), (zs,))
    assert torch.autograd.gradcheck(lambda s: dist_relations(s, zt, T), (zs,))


def test_warmup_factor_grows_linearly_then_holds():
    """Epoch e (from 0) weighs min((e + 1) / warm-up, 1); no warm-up weighs 1 from the start."""
    for epoch in range(26):
        assert warmup_factor(epoch, 20) == pytest.approx(min((epoch + 1) / 20, 1.0), abs=1e-15)
        assert warmup_factor(epoch, 0) == 1.0
    assert warmup_factor(0, 1) == 1.0


def test_dkd_method_weighs_its_terms_and_warms_them_up():
    """loss = loss_cls CE + warm-up (alpha TCKD + beta NCKD); epoch 0's distillation part is
    1/20 of epoch 30's with a 20-epoch warm-up, the cross-entropy unchanged."""
    settings = DKDSettings(temperature=3.0, alpha=0.7, beta=5.0, loss_cls=0.4, warmup_epochs=20)
    method = DKD(LinearNet(12, 10, seed=1), LinearNet(12, 10, seed=2), settings)
    assert not method.teacher_encoder.training
    assert not any(p.requires_grad for p in method.teacher_encoder.parameters())
    batch = method_batch()
    x, y = batch.views[0], batch.labels
    with torch.no_grad():
        zs, zt = method.student_encoder(x), method.teacher_encoder(x)
    ce = F.cross_entropy(zs, y).item()  # the library's CE: pinned against formulas in test_kd
    ref_tckd, ref_nckd = dkd_reference(zs.numpy(), zt.numpy(), y.tolist(), 3.0)
    full = 0.7 * ref_tckd + 5.0 * ref_nckd

    method.begin_epoch(30)
    late = method(batch)
    assert late.loss.item() == pytest.approx(0.4 * ce + full, rel=1e-9)
    assert late.metrics["loss_tckd"].item() == pytest.approx(ref_tckd, rel=1e-9)
    assert late.metrics["loss_nckd"].item() == pytest.approx(ref_nckd, rel=1e-9)
    method.begin_epoch(0)
    early = method(batch)
    assert early.loss.item() == pytest.approx(0.4 * ce + full / 20, rel=1e-9)
    assert (early.loss.item() - 0.4 * ce) * 20 == pytest.approx(late.loss.item() - 0.4 * ce,
                                                                rel=1e-9)
    early.loss.backward()
    assert all(p.grad is None for p in method.teacher_encoder.parameters())
    assert all(p.grad is not None for p in method.student_encoder.parameters())


@pytest.mark.parametrize("B,C,tau", [(8, 10, 1.0), (16, 100, 4.0), (32, 5, 4.0), (6, 7, 2.0)])
def test_dist_relations_match_the_papers_pearson_formulas(B, C, tau):
    """inter (rows) and intra (columns) against numpy's exact Pearson; the authors' eps=1e-8
    moves them by far less than the tolerance."""
    zs, zt, _ = logits(B, C, seed=B + C)
    inter, intra = dist_relations(zs, zt, tau)
    ref_inter, ref_intra = dist_reference(zs.numpy(), zt.numpy(), tau)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-6, abs=1e-6)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-6, abs=1e-6)


def test_dist_relations_vanish_for_equal_logits_and_ignore_row_shifts():
    """Equal logits: both relations are 0 up to the authors' eps (1 - n^2 / (n^2 + eps) <=
    eps / n^2 per row or column of centred norm n). A per-row constant added to either side's
    logits leaves softmax, and so both relations, unchanged."""
    zs, zt, _ = logits(12, 10, seed=3)
    y = softmax_rows(zt.numpy(), 4.0)
    for value, rows in zip(dist_relations(zt, zt, 4.0), (y, y.T)):  # inter: rows; intra: columns
        centred = rows - rows.mean(1, keepdims=True)
        assert 0 <= value.item() <= 4.0 ** 2 * 1e-8 / (centred ** 2).sum(1).min()
    shift = torch.randn(12, 1, dtype=torch.float64) * 50
    for shifted, plain in zip(dist_relations(zs + shift, zt - 2 * shift, 4.0),
                              dist_relations(zs, zt, 4.0)):
        assert shifted.item() == pytest.approx(plain.item(), rel=1e-9, abs=1e-12)


def test_dist_method_weighs_ce_and_both_relations():
    """loss = loss_cls CE + loss_dist (beta inter + gamma intra), the terms written out."""
    settings = DISTSettings(temperature=4.0, beta=0.6, gamma=1.7, loss_cls=0.3, loss_dist=2.0)
    method = DIST(LinearNet(12, 10, seed=3), LinearNet(12, 10, seed=4), settings)
    assert not method.teacher_encoder.training
    batch = method_batch(batch=16, seed=5)
    x, y = batch.views[0], batch.labels
    with torch.no_grad():
        zs, zt = method.student_encoder(x), method.teacher_encoder(x)
    ce = F.cross_entropy(zs, y).item()
    ref_inter, ref_intra = dist_reference(zs.numpy(), zt.numpy(), 4.0)
    out = method(batch)
    expected = 0.3 * ce + 2.0 * (0.6 * ref_inter + 1.7 * ref_intra)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert out.metrics["loss_inter"].item() == pytest.approx(ref_inter, rel=1e-6, abs=1e-6)
    assert out.metrics["loss_intra"].item() == pytest.approx(ref_intra, rel=1e-6, abs=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher_encoder.parameters())


def test_bf16_logits_give_fp32_losses_close_to_fp32():
    """bf16 logits: the terms come back in fp32 or wider, equal to the fp32 computation on the
    same (bf16-rounded) values and close to it on the unrounded fp32 logits."""
    zs, zt, labels = logits(16, 10, seed=11, spread=3.0, dtype=torch.float32)
    bs, bt = zs.bfloat16(), zt.bfloat16()
    pairs = [(dkd_terms(bs, bt, labels, 4.0), dkd_terms(bs.float(), bt.float(), labels, 4.0),
              dkd_terms(zs, zt, labels, 4.0)),
             (dist_relations(bs, bt, 4.0), dist_relations(bs.float(), bt.float(), 4.0),
              dist_relations(zs, zt, 4.0))]
    for low, rounded, exact in pairs:
        for value, same_inputs, unrounded in zip(low, rounded, exact):
            assert value.dtype in (torch.float32, torch.float64)
            assert math.isfinite(value.item())
            assert value.item() == pytest.approx(same_inputs.item(), rel=1e-5, abs=1e-6)
            assert value.item() == pytest.approx(unrounded.item(), rel=3e-2, abs=1e-3)
