import copy
import math

import numpy as np
import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.data import Batch
from cocord_fast.methods import build_method
from cocord_fast.methods.losses import kd_loss
from cocord_fast.models import build_model
from cocord_fast.training.metrics import read_log
from cocord_fast.training.trainer import Trainer, train


def kd_reference(student_logits, teacher_logits, T):
    """T^2 * mean_i sum_c p_t log(p_t / p_s), written out in float64."""
    total = 0.0
    for zs, zt in zip(student_logits.tolist(), teacher_logits.tolist()):
        ps = [math.exp(v / T) for v in zs]
        pt = [math.exp(v / T) for v in zt]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(t * math.log(t / s) for s, t in zip(ps, pt))
    return T * T * total / len(student_logits)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_the_formula(T):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3, torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    assert kd_loss(zs, zt, T).item() == pytest.approx(kd_reference(zs, zt, T), rel=1e-6)
    assert kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-12)


def make_kd(**kd):
    cfg = load_config(overrides=[f"kd.{k}={v}" for k, v in kd.items()])
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10).double(), build_model("resnet14", 10).double()
    return build_method("kd", cfg, student, teacher, np.arange(100) % 10)


def test_kd_step_weights_terms_and_keeps_the_teacher_frozen():
    method = make_kd(loss_cls=0.3, loss_kd=0.7, temperature=2.0)
    method.train()
    assert not method.teacher_encoder.training and method.student_encoder.training
    teacher_before = {k: v.clone() for k, v in method.teacher_encoder.state_dict().items()}
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    out = method(Batch([x], y))
    ce = torch.nn.functional.cross_entropy(method.student_encoder(x), y)
    with torch.no_grad():
        expected_kd = kd_reference(method.student_encoder(x), method.teacher_encoder(x), 2.0)
    assert out.metrics["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * expected_kd, rel=1e-6)
    params = {id(p) for p in method.trainable_module().parameters()}
    assert params == {id(p) for p in method.student_encoder.parameters()}
    optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.1)
    out.loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in method.teacher_encoder.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher_encoder.state_dict().items())


def test_kd_run_through_the_trainer_logs_hintons_terms_of_its_first_batch(tiny_overrides,
                                                                           tmp_path):
    """The first step's logged terms against Hinton's formula and cross-entropy, written out
    in float64 on the logits of that step's batch (the weights before its update)."""
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet14", 10).state_dict()}, teacher)  # RepDistiller format
    trainer = Trainer(load_config(overrides=tiny_overrides + [
        "method.name=kd", "model.teacher=resnet14", f"model.teacher_checkpoint={teacher}",
        "train.max_steps=3"]))
    trainer.loaders.train.start(0)
    batch = next(iter(trainer.loaders.train))
    student = copy.deepcopy(trainer.method.student()).train()  # batch statistics, as the step
    with torch.no_grad():
        zs = student(batch.views[0]).double()
        zt = trainer.method.teacher_encoder(batch.views[0]).double()
    trainer.fit()
    first, *_, last = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert first["step"] == 1 and last["step"] == 3
    expected_kd = kd_reference(zs, zt, 4.0)
    expected_cls = sum(math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in
                       zip(zs.tolist(), batch.labels.tolist())) / len(zs)
    # Both sides run the float32 networks, whose sums may be ordered differently (threads,
    # layouts): last-bit differences of the logits, which the KL of two nearby distributions
    # amplifies to ~1e-5 relative. A wrong term (no T^2, no temperature, another weight) is
    # off by far more.
    assert first["loss_kd"] == pytest.approx(expected_kd, rel=1e-4)
    assert first["loss_cls"] == pytest.approx(expected_cls, rel=1e-5)
    assert first["loss"] == pytest.approx(0.1 * expected_cls + 0.9 * expected_kd, rel=1e-4)


def test_a_teacher_that_does_not_fit_is_a_clear_error(tiny_overrides, tmp_path):
    from cocord_fast.errors import UserError

    teacher = tmp_path / "teacher.pth"
    torch.save(build_model("resnet8", 10).state_dict(), teacher)
    with pytest.raises(UserError, match="weights in .*teacher.pth do not fit"):
        train(load_config(overrides=tiny_overrides + [
            "method.name=kd", "model.teacher=resnet14", f"model.teacher_checkpoint={teacher}"]))
    with pytest.raises(UserError, match="method.name=kd needs model.teacher and model.teacher_checkpoint"):
        train(load_config(overrides=tiny_overrides + ["method.name=kd"]))
