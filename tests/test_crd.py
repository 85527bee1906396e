"""CRD: the NCE loss and memory banks against the formulas, the negative sampler, the method and
a short run through the Trainer."""
import math
import shutil

import numpy as np
import pytest
import torch

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import load_config
from cocord_fast.data import Batch
from cocord_fast.data.order import epoch_order
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError
from cocord_fast.methods import build_method, method_class
from cocord_fast.methods.crd import CRD
from cocord_fast.methods.crd_loss import CRDLoss, nce_loss
from cocord_fast.methods.crd_negatives import NegativeSampler
from cocord_fast.models import build_model
from cocord_fast.training.metrics import read_log
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer, train

from formulas import reference_nce, reference_step
from launch import train_losses
from markers import BACKENDS

N_DATA, K, E, B, D_S, D_T, TAU, MOMENTUM = 50, 7, 8, 4, 5, 6, 0.07, 0.5


def small_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(B, D_S, generator=g, dtype=torch.float64)
    f_t = torch.randn(B, D_T, generator=g, dtype=torch.float64)
    index = torch.randperm(N_DATA, generator=g)[:B]
    negatives = torch.randint(0, N_DATA, (B, K), generator=g)
    return f_s, f_t, index, torch.cat([index[:, None], negatives], 1)


@pytest.fixture
def crd_loss():
    torch.manual_seed(0)
    return CRDLoss(D_S, D_T, N_DATA, E, TAU, MOMENTUM).double()


def test_nce_loss_matches_formula():
    x = torch.rand(B, K + 1, dtype=torch.float64) * 3
    assert nce_loss(x, N_DATA).item() == pytest.approx(reference_nce(x.tolist(), N_DATA), rel=1e-12)


def test_bank_initialisation(crd_loss):
    bound = 1 / math.sqrt(E / 3)
    for bank in (crd_loss.student_memory, crd_loss.teacher_memory):
        assert bank.shape == (N_DATA, E)
        assert bank.abs().max() <= bound and bank.abs().max() > 0.8 * bound
    assert not torch.equal(crd_loss.student_memory, crd_loss.teacher_memory)
    assert crd_loss.student_normalizer.item() < 0 and crd_loss.teacher_normalizer.item() < 0


def test_loss_normalizers_and_banks_match_reference_over_two_steps(crd_loss):
    z_first = None
    for step in range(2):
        f_s, f_t, index, contrast_index = small_case(step)
        f_s.requires_grad_(True)
        expected, z, s_bank, t_bank = reference_step(crd_loss, f_s, f_t, index, contrast_index)
        if step == 1:
            assert z == z_first  # the second batch uses the first batch's Z
        untouched = torch.ones(N_DATA, dtype=torch.bool)
        untouched[index] = False
        before = crd_loss.student_memory.clone(), crd_loss.teacher_memory.clone()
        value = crd_loss(f_s, f_t, index, contrast_index)
        assert value.dtype == torch.float64
        assert value.item() == pytest.approx(expected, rel=1e-10)
        z_now = [crd_loss.student_normalizer.item(), crd_loss.teacher_normalizer.item()]
        assert z_now == pytest.approx(z, rel=1e-12)
        z_first = z_first or z_now
        value.backward()  # reads the banks as the forward did: they are refreshed after it
        assert torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
        assert torch.equal(crd_loss.student_memory, before[0])
        assert torch.equal(crd_loss.teacher_memory, before[1])
        crd_loss.refresh_banks_()
        # Refreshed rows follow the formula; every other row is bit-identical.
        torch.testing.assert_close(crd_loss.student_memory, s_bank, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd_loss.teacher_memory, t_bank, rtol=1e-12, atol=1e-12)
        assert torch.equal(crd_loss.student_memory[untouched], before[0][untouched])
        assert torch.equal(crd_loss.teacher_memory[untouched], before[1][untouched])
        assert not torch.equal(crd_loss.student_memory[index], before[0][index])
        crd_loss.refresh_banks_()  # once only
        torch.testing.assert_close(crd_loss.student_memory, s_bank, rtol=1e-12, atol=1e-12)


def test_a_replaced_rows_memory_is_written_back_unchanged(crd_loss):
    """Rows whose image stood in for an unreadable file: the loss is the same, their bank rows
    keep their values, and every other row follows the formula (the reference step)."""
    f_s, f_t, index, contrast_index = small_case(0)
    expected, _, s_bank, t_bank = reference_step(crd_loss, f_s, f_t, index, contrast_index)
    replaced = torch.zeros(B, dtype=torch.bool)
    replaced[[1, 3]] = True
    before = crd_loss.student_memory.clone(), crd_loss.teacher_memory.clone()
    value = crd_loss(f_s, f_t, index, contrast_index, replaced)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    crd_loss.refresh_banks_()
    kept = index[replaced]
    for bank, reference, old in ((crd_loss.student_memory, s_bank, before[0]),
                                 (crd_loss.teacher_memory, t_bank, before[1])):
        assert torch.equal(bank[kept], old[kept])
        reference[kept] = old[kept]
        torch.testing.assert_close(bank, reference, rtol=1e-12, atol=1e-12)


def test_gradient_matches_reference(crd_loss):
    """Autograd through the module equals autograd through the written-out formula."""
    f_s, f_t, index, contrast_index = small_case(3)
    banks = crd_loss.student_memory.clone(), crd_loss.teacher_memory.clone()
    weight = crd_loss.student_embed.linear.weight
    crd_loss(f_s, f_t, index, contrast_index).backward()
    grad = weight.grad.clone()

    weight.grad = None
    z_s, z_t = crd_loss.student_normalizer, crd_loss.teacher_normalizer
    v_s = crd_loss.student_embed.linear(f_s)
    v_s = v_s / v_s.norm(dim=1, keepdim=True)
    x = torch.exp(torch.einsum("bke,be->bk", banks[1][contrast_index], v_s) / TAU) / z_s
    noise, eps = K / N_DATA, 1e-7
    # Only the student direction depends on the student head.
    ref = -(torch.log(x[:, 0] / (x[:, 0] + noise + eps)).sum()
            + torch.log(noise / (x[:, 1:] + noise + eps)).sum()) / B
    ref.backward()
    torch.testing.assert_close(grad, weight.grad, rtol=1e-10, atol=1e-12)
    assert z_t.item() > 0


def test_a_second_forward_before_the_first_backward_is_refused(crd_loss):
    """The second forward writes the first's refresh into the banks the first backward
    reads: autograd refuses that backward rather than give a wrong gradient (the engines run
    a backward after each forward)."""
    first = crd_loss(*small_case(0))
    second = crd_loss(*small_case(1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first + second).backward()


def test_a_state_dict_holds_the_refreshed_banks(crd_loss):
    f_s, f_t, index, contrast_index = small_case(0)
    _, _, s_bank, t_bank = reference_step(crd_loss, f_s, f_t, index, contrast_index)
    crd_loss(f_s, f_t, index, contrast_index).backward()
    state = crd_loss.state_dict()
    torch.testing.assert_close(state["student_memory"], s_bank, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["teacher_memory"], t_bank, rtol=1e-12, atol=1e-12)


def test_normalizers_survive_state_dict(crd_loss):
    crd_loss(*small_case(0))
    state = crd_loss.state_dict()
    assert {"student_memory", "teacher_memory", "student_normalizer",
            "teacher_normalizer"} <= set(state)
    fresh = CRDLoss(D_S, D_T, N_DATA, E, TAU, MOMENTUM).double()
    fresh.load_state_dict(state)
    assert fresh.student_normalizer.item() == crd_loss.student_normalizer.item() > 0
    args = small_case(1)
    assert fresh(*args).item() == crd_loss(*args).item()


# ------------------------------------------------------ negative sampler
TARGETS = torch.tensor([0] * 20 + [1] * 15 + [2] * 10 + [3] * 5)  # imbalanced, n = 50


def check_contrast(contrast: torch.Tensor, index: torch.Tensor, k: int) -> None:
    assert contrast.shape == (len(index), k + 1) and contrast.dtype == torch.long
    assert contrast.device.type == "cpu"
    assert torch.equal(contrast[:, 0], index)
    negatives = contrast[:, 1:]
    assert negatives.min() >= 0 and negatives.max() < len(TARGETS)
    assert not (TARGETS[negatives] == TARGETS[index][:, None]).any()


@pytest.mark.parametrize("budget", [10 ** 9, 0], ids=["exact", "with_replacement"])
def test_sampler_draws_other_classes_positive_first(budget):
    sampler = NegativeSampler(TARGETS.numpy(), 12, seed=3, exact_budget=budget)
    assert sampler.with_replacement(8) == (budget == 0)
    index = torch.tensor([0, 19, 20, 34, 35, 44, 45, 49])  # both ends of every class block
    seen = torch.zeros(len(TARGETS), dtype=torch.bool)
    for step in range(40):
        contrast = sampler.sample(index, step)
        check_contrast(contrast, index, 12)
        seen[contrast[index == 45, 1:]] = True  # anchor of class 3
        if budget:  # without replacement: no duplicates within a row
            assert all(len(set(row)) == 12 for row in contrast[:, 1:].tolist())
    assert torch.equal(seen, TARGETS != 3)  # the whole other-class pool is reachable


@pytest.mark.parametrize("draw", ["host", "keys"])
def test_sampler_exact_mode_is_uniform_over_the_pool(draw, monkeypatch):
    if draw == "keys":  # the GPU's draw (float64 keys, topk), here on CPU tensors
        monkeypatch.setattr(NegativeSampler, "_exact_on_the_host",
                            lambda self, labels, number: self._exact(labels, self._seeded(number)))
    sampler = NegativeSampler(TARGETS, 30, seed=0)  # 30 of class 3's pool of 45 per draw
    counts = torch.zeros(len(TARGETS))
    for step in range(200):
        contrast = sampler.sample(torch.tensor([45, 0]), step)
        assert all(len(set(row)) == 30 for row in contrast[:, 1:].tolist())
        assert torch.equal(contrast[:, 1:], contrast[:, 1:].sort(dim=1).values)
        counts += torch.bincount(contrast[0, 1:], minlength=len(TARGETS))
    pool, expected = counts[TARGETS != 3], 200 * 30 / 45  # binomial sd ~6.7
    assert counts[TARGETS == 3].sum() == 0
    assert expected - 27 < pool.min() and pool.max() < expected + 27


@pytest.mark.parametrize("budget", [10 ** 9, 0])
def test_sampler_is_reproducible_from_seed_and_step(budget):
    index = torch.arange(0, 50, 7)
    a = NegativeSampler(TARGETS, 9, seed=1, exact_budget=budget)
    b = NegativeSampler(TARGETS, 9, seed=1, exact_budget=budget)
    torch.manual_seed(123)
    first = a.sample(index, 5)
    a.sample(index, 6)
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(first, b.sample(index, 5))
    assert torch.equal(first, a.sample(index, 5))
    assert not torch.equal(first, a.sample(index, 6))
    assert not torch.equal(first, NegativeSampler(TARGETS, 9, seed=2, exact_budget=budget)
                           .sample(index, 5))


def test_sampler_rejects_more_negatives_than_the_pool():
    NegativeSampler(TARGETS, 30, seed=0)  # largest class 20: 30 others
    with pytest.raises(UserError, match="crd.num_negatives=31"):
        NegativeSampler(TARGETS, 31, seed=0)


# ------------------------------------------------------ the method
NUM_DATA = 32
SYNTHETIC_TARGETS = np.arange(NUM_DATA) % 4


def make_crd(loss_kd: float = 0.0) -> CRD:
    torch.manual_seed(0)
    cfg = load_config(overrides=["method.name=crd", f"crd.loss_kd={loss_kd}", "crd.embed_dim=16",
                                 "crd.num_negatives=10"])
    student, teacher = build_model("resnet8", 10), build_model("wrn_16_2", 10)  # d_s 64, d_t 128
    return build_method("crd", cfg, student, teacher, SYNTHETIC_TARGETS)


def synthetic_batch(batch: int = 8) -> Batch:
    g = torch.Generator().manual_seed(100)
    images = torch.randn(NUM_DATA, 3, 16, 16, generator=g)
    index = torch.arange(batch)
    return Batch([images[index]], torch.as_tensor(SYNTHETIC_TARGETS)[index], index)


def test_registry_and_declarations():
    assert method_class("crd") is CRD and CRD.needs_teacher and CRD.num_views == 1
    assert CRD.run_label(load_config()) == "CRD"
    assert CRD.run_label(load_config(overrides=["crd.loss_kd=0.5"])) == "CRD+KD"


def test_the_method_draws_its_negatives_from_the_seed_and_the_micro_batch_number():
    method, seen = make_crd(), []
    sample = method.negatives.sample
    method.negatives.sample = lambda index, draw: seen.append(sample(index, draw)) or seen[-1]
    batch = synthetic_batch()
    for number in (0, 5, 5):
        method.begin_micro_batch(number)
        method(batch)
    expected = NegativeSampler(SYNTHETIC_TARGETS, 10, seed=0).sample(batch.index, 5)
    assert torch.equal(seen[1], expected) and torch.equal(seen[2], expected)
    assert not torch.equal(seen[0], seen[1])
    assert seen[1].shape == (8, 11) and torch.equal(seen[1][:, 0], batch.index)


def test_trainable_module_is_student_and_heads():
    method = make_crd()
    trainable = {id(p) for p in method.trainable_module().parameters()}
    expected = {id(p) for m in (method.student_encoder, method.crd.student_embed,
                                method.crd.teacher_embed) for p in m.parameters()}
    assert trainable == expected
    assert not trainable & {id(p) for p in method.teacher_encoder.parameters()}
    assert not any("memory" in name for name, _ in method.trainable_module().named_buffers())
    assert {"crd.student_memory", "crd.teacher_normalizer"} <= set(method.state_dict())


def test_steps_lower_the_loss_and_leave_the_teacher_alone():
    """Six steps on one fixed batch (images and negatives) lower its loss: not step by step,
    since each step also refreshes the bank rows the next one reads."""
    method = make_crd(loss_kd=1.0).train()
    assert not method.teacher_encoder.training
    teacher_before = {k: v.clone() for k, v in method.teacher_encoder.state_dict().items()}
    optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.05, momentum=0.9)
    batch, losses = synthetic_batch(), []
    for _ in range(6):
        out = method(batch)
        assert set(out.metrics) == {"loss_cls", "loss_crd", "loss_kd"}
        assert all(torch.isfinite(v) and not v.requires_grad for v in out.metrics.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0] and len(set(losses)) == 6
    assert all(torch.equal(v, teacher_before[k])
               for k, v in method.teacher_encoder.state_dict().items())


def test_runs_in_float64_and_under_bf16_autocast():
    method = make_crd().double()
    batch = synthetic_batch()
    batch.views = [v.double() for v in batch.views]
    out = method(batch)
    assert out.loss.dtype == torch.float64 and set(out.metrics) == {"loss_cls", "loss_crd"}
    out.loss.backward()

    method = make_crd()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(synthetic_batch())
    assert torch.isfinite(out.loss)
    assert method.crd.student_memory.dtype == torch.float32
    assert method.crd.teacher_normalizer.dtype == torch.float32


# ------------------------------------------------------ through the Trainer
@pytest.fixture
def crd_overrides(tiny_overrides, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 10).state_dict(), checkpoint)
    return tiny_overrides + ["model.teacher=resnet8", f"model.teacher_checkpoint={checkpoint}",
                             "method.name=crd", "crd.num_negatives=16"]


def test_trainer_runs_crd_and_resumes_with_the_same_negatives(crd_overrides, tmp_path):
    full = crd_overrides + [f"train.output_dir={tmp_path / 'full'}", "train.max_steps=3"]
    result = train(load_config(overrides=full))
    assert result.step == 3
    records = [r for r in read_log(tmp_path / "full") if r["kind"] == "train"]
    assert all(math.isfinite(r["loss_crd"]) and r["loss_crd"] > 0 for r in records)
    state = load_checkpoint(tmp_path / "full" / "last.pt")["method"]
    assert state["crd.student_memory"].shape == (120, 128)
    assert state["crd.student_normalizer"] > 0 and state["crd.teacher_normalizer"] > 0

    split = crd_overrides + [f"train.output_dir={tmp_path / 'split'}", "train.max_steps=1"]
    train(load_config(overrides=split))
    torch.manual_seed(999)
    train(config_for_resume(tmp_path / "split", ["train.max_steps=3"]))


    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")


def test_trainer_rejects_too_many_negatives(crd_overrides):
    with pytest.raises(UserError, match="crd.num_negatives"):
        Trainer(load_config(overrides=crd_overrides + ["crd.num_negatives=500"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_never_writes_a_row_twice_nor_the_unreadable_files_row(
        crd_overrides, tiny_demo_root, tmp_path, monkeypatch, backend):
    """Two epochs with an unreadable file in both: every refresh writes distinct rows, each
    row learns at most once an epoch, and the unreadable file's row keeps its first value."""
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    orders = [set(epoch_order(120, 16, seed=0, epoch=e)[0].tolist()) for e in (0, 1)]
    bad_index = min(orders[0] & orders[1])  # trained in both epochs
    bad = open_source("demo", root, train=True).path(bad_index)
    bad.write_bytes(bad.read_bytes()[:200])
    written = []
    refreshed_rows = CRDLoss._refreshed_rows

    def recorded(self, index, v_s, v_t, unchanged):
        written.append((index.clone(), unchanged.squeeze(1).clone()))
        return refreshed_rows(self, index, v_s, v_t, unchanged)

    monkeypatch.setattr(CRDLoss, "_refreshed_rows", recorded)
    trainer = Trainer(load_config(overrides=crd_overrides + [
        f"data.root={root}", f"data.backend={backend}", "data.skip_corrupt=true"]))
    first = [bank[bad_index].clone() for bank in (trainer.method.crd.student_memory,
                                                  trainer.method.crd.teacher_memory)]
    trainer.fit()
    assert trainer.skipped_files == 2 and len(written) == 14
    for epoch in (written[:7], written[7:]):
        assert all(len(set(index.tolist())) == len(index) for index, _ in epoch)
        learned = [i for index, unchanged in epoch for i in index[~unchanged].tolist()]
        assert len(learned) == len(set(learned)) == 16 * 7 - 1 and bad_index not in learned
    banks = trainer.method.crd.student_memory, trainer.method.crd.teacher_memory
    assert all(torch.equal(bank[bad_index], row) for bank, row in zip(banks, first))
