"""CoCoRD (METHOD.md §1): losses against the formulas in float64, the queue, the momentum
updates, what trains and what does not (reference checkpoints: test_cocord_reference.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import Config, load_config, merge
from cocord_fast.data import Batch
from cocord_fast.kernels import momentum_update_, queue_infonce
from cocord_fast.methods import build_method
from cocord_fast.methods.cocord import CoCoRD
from cocord_fast.models import build_model

from formulas import formula_ce, formula_ctr, formula_kd, formula_pred, recompute_terms, unit

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(queue_size=10, embed_dim=8, proj_hidden_dim=16, pred_hidden_dim=8)
NUM_CLASSES = 10


def make(student="resnet8", teacher="resnet14", dtype=torch.float64, **overrides) -> CoCoRD:
    cfg = Config()
    merge(cfg, {"cocord": {**SMALL, **overrides}})
    torch.manual_seed(0)
    method = build_method("cocord", cfg, build_model(student, NUM_CLASSES),
                          build_model(teacher, NUM_CLASSES), np.zeros(0))
    return method.to(dtype).train()


def make_batch(size=4, dtype=torch.float64, seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(size, 3, 16, 16, generator=g).to(dtype) for _ in range(3)]
    return Batch(views, torch.randint(0, NUM_CLASSES, (size,), generator=g))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ---- losses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_kd", [0.0, 0.5])
def test_every_loss_term_and_the_total_match_the_formulas(loss_kd):
    weights = dict(loss_ctr=0.7, loss_cls=1.3, loss_pred=2.5, loss_kd=loss_kd)
    method = make(temperature=0.2, kd_temperature=3.0, **weights)
    batch = make_batch()
    method.queue_ptr.fill_(8)  # this batch of 4 wraps: slots 8, 9, 0, 1
    queue_before = method.queue.clone()

    out = method(batch)
    terms = recompute_terms(method, batch)
    ctr, top1 = formula_ctr(terms["z"], terms["k"], queue_before, 0.2)
    pred = formula_pred(terms["p"], terms["t"], terms["p2"], terms["t2"])
    cls = formula_ce(terms["logits"], batch.labels)
    expected = {"loss_ctr": ctr, "loss_pred": pred, "loss_cls": cls}
    total = 0.7 * ctr + 1.3 * cls + 2.5 * pred
    if loss_kd:
        expected["loss_kd"] = formula_kd(terms["logits"], terms["teacher_logits"], 3.0)
        total = total + loss_kd * expected["loss_kd"]
    assert set(out.metrics) == {*expected, "ctr_top1"}
    for name, value in expected.items():
        assert out.metrics[name].item() == pytest.approx(value.item(), rel=1e-10), name
    assert out.metrics["ctr_top1"].item() == pytest.approx(top1)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-10)
    assert all(not m.requires_grad for m in out.metrics.values())

    # The logits used the queue from before the enqueue: the batch's keys are not negatives.
    queue_after = method.queue.clone()
    assert formula_ctr(terms["z"], terms["k"], queue_after, 0.2)[0].item() != pytest.approx(
        ctr.item(), rel=1e-6)
    keys = torch.stack([unit(row) for row in terms["k"]])
    assert torch.allclose(queue_after[[8, 9, 0, 1]], keys, rtol=0, atol=1e-12)
    assert torch.equal(queue_after[2:8], queue_before[2:8])
    assert method.queue_ptr.item() == 2


def test_queue_infonce_value_gradient_and_top1():
    torch.manual_seed(3)
    q = nn.functional.normalize(torch.randn(5, 6, dtype=torch.float64), dim=1)
    k = nn.functional.normalize(torch.randn(5, 6, dtype=torch.float64), dim=1)
    queue = nn.functional.normalize(torch.randn(7, 6, dtype=torch.float64), dim=1)
    e = torch.eye(6, dtype=torch.float64)  # exact dot products, whatever the reduction order
    q[0], k[0] = e[1], e[1]  # row 0: positive 1, every negative below it
    q[1], k[1], queue[0] = e[0], e[0], e[0]  # row 1: a negative ties the positive: a win
    q[2], queue[1] = e[2], e[2]  # row 2: a negative equal to the query beats its positive
    q.requires_grad_()
    loss, top1 = queue_infonce(q, k, queue, 0.1)
    expected, wins = formula_ctr(q, k, queue, 0.1, normalize=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert top1.item() == pytest.approx(wins) and not top1.requires_grad
    assert 0.4 <= wins <= 0.8  # the crafted rows: 0 and 1 win, 2 loses
    (grad,) = torch.autograd.grad(loss, q)
    (expected_grad,) = torch.autograd.grad(expected, q)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)


# ---- queue ----------------------------------------------------------------------------------

def test_enqueue_is_a_fifo_ring_that_wraps_when_the_batch_does_not_divide_the_queue():
    method = make(embed_dim=2)
    method.queue.fill_(0.5)  # marks slots no key has reached
    model_rows, model_ptr = [[0.5, 0.5]] * 10, 0  # a plain FIFO ring, filled key by key
    key_id = 0
    for size in (3, 3, 3, 3, 13, 4):  # 12 keys wrap at 10; a batch of 13 laps the queue
        ids = torch.arange(key_id, key_id + size, dtype=torch.float64)
        method.enqueue_(torch.stack([ids, -ids], dim=1))
        for i in range(key_id, key_id + size):
            model_rows[model_ptr], model_ptr = [i, -i], (model_ptr + 1) % 10
        key_id += size
        assert method.queue.tolist() == model_rows
        assert method.queue_ptr.item() == model_ptr and method.queue_ptr.dtype == torch.long


def test_queue_starts_as_unit_rows_and_keeps_the_module_dtype_under_bf16_autocast():
    method = make(dtype=torch.float32)
    assert method.queue.shape == (10, 8)
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(make_batch(dtype=torch.float32))
    out.loss.backward()
    assert method.queue.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.allclose(method.queue[:4].norm(dim=1), torch.ones(4), atol=1e-2)
    assert make().queue.dtype == torch.float64  # .double() converts the queue with the rest


def test_bf16_contrast_inputs_cost_less_than_rounding_the_gradient_at_training_shapes():
    """Under bf16 autocast q, k and the queue snapshot reach the loss rounded to bf16
    (`contrast_inputs`); at B=256, E=2048, N=16384 that moves the loss by < 1e-4 and dq by
    < 2^-8 relative, against float64 on the fp32 inputs (dq itself is returned in bf16)."""
    from cocord_fast.kernels import queue_infonce_ref
    from cocord_fast.methods.cocord import contrast_inputs

    g = torch.Generator().manual_seed(0)
    B, E, N, temperature = 256, 2048, 16384, 0.1
    z = torch.randn(B, E, generator=g)
    keys = z + 1.5 * torch.randn(B, E, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(N, E, generator=g), dim=1)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, snapshot = contrast_inputs(z.to(dtype), keys.to(dtype), queue)
        assert q.dtype == k.dtype == snapshot.dtype == dtype
        assert snapshot.data_ptr() != queue.data_ptr()  # a copy, whatever the dtype
        q = q.double().requires_grad_()
        loss, _ = queue_infonce_ref(q, k.double(), snapshot.double(), temperature)
        loss.backward()
        results[dtype] = loss.item(), q.grad
    (exact, exact_grad), (rounded, rounded_grad) = results.values()
    assert 0 < abs(rounded - exact) < 1e-4
    assert (rounded_grad - exact_grad).norm() / exact_grad.norm() < 2 ** -8


def test_bf16_training_enqueues_the_keys_the_loss_saw():
    method = make(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method(make_batch(dtype=torch.float32))
    written = method.queue[:4]
    assert written.dtype == torch.float32
    assert torch.equal(written, written.to(torch.bfloat16).float())


# ---- momentum -------------------------------------------------------------------------------

@torch.no_grad()
def perturb_student(method):
    for p in [*method.student_encoder.parameters(), *method.student_projector.parameters()]:
        p.add_(torch.randn_like(p))


def slow_and_heads(method):
    return {"slow_encoder": snapshot(method.slow_encoder),
            "slow_projector": snapshot(method.slow_projector),
            "teacher_projector": snapshot(method.teacher_projector)}


def test_first_update_after_init_is_a_no_op():
    method = make()
    assert_same(snapshot(method.slow_encoder), snapshot(method.student_encoder))
    assert_same(snapshot(method.teacher_projector), snapshot(method.student_projector))
    before = slow_and_heads(method)
    method.on_optimizer_step()
    for name, state in slow_and_heads(method).items():
        assert_same(state, before[name])


def test_momentum_zero_copies_and_momentum_one_freezes():
    method = make(student_momentum=0.0, teacher_head_momentum=0.0)
    perturb_student(method)
    method.on_optimizer_step()
    params = dict(method.named_parameters())
    for prefix, source in (("slow_encoder.", "student_encoder."),
                           ("slow_projector.", "student_projector."),
                           ("teacher_projector.", "student_projector.")):
        for name, value in params.items():
            if name.startswith(prefix):
                assert torch.equal(value, params[source + name[len(prefix):]]), name

    method = make(student_momentum=1.0, teacher_head_momentum=1.0)
    before = slow_and_heads(method)
    perturb_student(method)
    method.on_optimizer_step()
    for name, state in slow_and_heads(method).items():
        assert_same(state, before[name])


def test_two_momenta_in_one_multi_tensor_update(monkeypatch):
    method = make(student_momentum=0.9, teacher_head_momentum=0.5)
    before = {k: v.clone() for k, v in method.named_parameters()}
    perturb_student(method)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(a), lerp(*a)))
    method.on_optimizer_step()
    assert len(calls) == 1  # slow student and teacher head together
    params = dict(method.named_parameters())
    for prefix, source, m in (("slow_encoder.", "student_encoder.", 0.9),
                              ("slow_projector.", "student_projector.", 0.9),
                              ("teacher_projector.", "student_projector.", 0.5)):
        names = [n for n in params if n.startswith(prefix)]
        assert names
        for name in names:
            expected = m * before[name] + (1 - m) * params[source + name[len(prefix):]]
            assert torch.allclose(params[name], expected, rtol=1e-12, atol=1e-12), name


def test_momentum_update_function_with_per_tensor_momenta():
    targets = [torch.zeros(3, dtype=torch.float64) for _ in range(3)]
    sources = [torch.full((3,), 2.0, dtype=torch.float64) for _ in range(3)]
    momentum_update_(targets, sources, [0.0, 1.0, 0.25])
    assert [t[0].item() for t in targets] == [2.0, 0.0, 1.5]


def test_only_parameters_are_averaged_not_batchnorm_buffers():
    method = make(student_momentum=0.0, teacher_head_momentum=0.0)
    with torch.no_grad():
        method.student_encoder.bn1.running_mean.fill_(5.0)
        method.student_projector[1].running_var.fill_(7.0)
        method.student_encoder.bn1.weight.fill_(3.0)
    method.on_optimizer_step()
    assert torch.equal(method.slow_encoder.bn1.weight, method.student_encoder.bn1.weight)
    assert torch.all(method.slow_encoder.bn1.running_mean == 0)
    assert torch.all(method.slow_projector[1].running_var == 1)
    assert torch.all(method.teacher_projector[1].running_var == 1)


# ---- what trains, what does not -------------------------------------------------------------

def test_only_the_trainable_module_learns_and_the_teacher_never_changes():
    method = make()
    trainable = {id(p) for p in method.trainable_module().parameters()}
    online = [method.student_encoder, method.student_projector, method.predictor]
    frozen = [method.slow_encoder, method.slow_projector, method.teacher_projector,
              method.teacher_encoder]
    assert trainable == {id(p) for m in online for p in m.parameters()}
    assert not trainable & {id(p) for m in frozen for p in m.parameters()}
    assert len(method.state_dict()) == len(set(method.state_dict()))
    assert not any(k.startswith("_trainable") for k in method.state_dict())

    teacher = snapshot(method.teacher_encoder)
    optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.1, momentum=0.9)
    for seed in (1, 2):
        out = method(make_batch(seed=seed))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is None for m in frozen for p in m.parameters())
        assert all(p.grad is not None for m in online for p in m.parameters())
        optimizer.step()
        method.on_optimizer_step()
    assert_same(snapshot(method.teacher_encoder), teacher)
    assert not torch.equal(method.slow_projector[0].weight, method.student_projector[0].weight)


def test_batchnorm_modes_teacher_eval_slow_student_and_teacher_head_train():
    method = make()
    method.eval().train()
    assert not any(m.training for m in method.teacher_encoder.modules())
    for module in (method.slow_encoder, method.slow_projector, method.teacher_projector,
                   method.student_encoder, method.predictor):
        assert all(m.training for m in module.modules())
    # Batch statistics in use: the running statistics of the slow student and the teacher head
    # move (one forward per view), the teacher's do not.
    slow_count = method.slow_encoder.bn1.num_batches_tracked.item()
    head_count = method.teacher_projector[1].num_batches_tracked.item()
    teacher_count = method.teacher_encoder.bn1.num_batches_tracked.item()
    method(make_batch())
    assert method.slow_encoder.bn1.num_batches_tracked.item() == slow_count + 2
    assert method.teacher_projector[1].num_batches_tracked.item() == head_count + 1
    assert method.teacher_encoder.bn1.num_batches_tracked.item() == teacher_count


def test_cross_architecture_pair_steps_with_a_frozen_teacher_head():
    method = make(student="resnet8", teacher="resnet8x4", dtype=torch.float32, loss_kd=1.0)
    assert method.student_encoder.num_features == 64 and method.teacher_encoder.num_features == 256
    assert method.teacher_projector[0].in_features == 256 and method.teacher_head_momentum == 1.0
    head = snapshot(method.teacher_projector)
    head_params = {k: v for k, v in head.items() if "running" not in k and "batches" not in k}
    optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.1)
    for seed in (1, 2):
        out = method(make_batch(dtype=torch.float32, seed=seed))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        method.on_optimizer_step()
        assert torch.isfinite(out.loss)
    after = snapshot(method.teacher_projector)
    assert all(torch.equal(after[k], v) for k, v in head_params.items())


def test_the_teacher_heads_effective_momentum_is_printed_and_saved(tiny_demo_root, tmp_path,
                                                                   capsys):
    """resnet32x4 (256 features) -> resnet8 (64): the teacher head cannot track the student's,
    so it runs frozen whatever cocord.teacher_head_momentum says."""
    from cocord_fast.training.metrics import read_log
    from cocord_fast.training.trainer import train

    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("resnet32x4", 10).state_dict(), teacher)
    train(load_config(overrides=[
        f"data.root={tiny_demo_root}", "data.batch_size=16", "data.num_workers=0",
        "data.backend=torch", "method.name=cocord", "model.student=resnet8",
        "model.teacher=resnet32x4", f"model.teacher_checkpoint={teacher}", "train.max_steps=1",
        "train.progress=false", "cocord.queue_size=32", "cocord.embed_dim=16",
        "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8",
        f"train.output_dir={tmp_path / 'run'}"]))
    assert ("cocord.teacher_head_momentum is 1.0 in this run, not 0.999: the teacher's "
            "features (256) and the student's (64) differ") in capsys.readouterr().out
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["effective_settings"] == {"cocord.teacher_head_momentum": 1.0}
    (effective,) = [r for r in read_log(tmp_path / "run") if r["kind"] == "effective"]
    assert effective["key"] == "cocord.teacher_head_momentum" and effective["value"] == 1.0
