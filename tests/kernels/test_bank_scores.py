"""bank_scores: each implementation (whole bank, chunked gather, Triton) against the scores and
the embedding gradient written out in float64 (a loop over rows: no gather, no bmm), on rows
that pick some bank rows twice, as CRD's negatives may."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from markers import interpreted, on_gpu

from cocord_fast.kernels import bank_scores, bank_scores_ref, implementations_used

bmod = importlib.import_module("cocord_fast.kernels.bank_scores")


def make_inputs(B, E, N, C, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    embedding = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=1)
    index = torch.randint(0, N, (B, C), generator=g)
    index[:, 1] = index[:, 2]  # a row picked twice: its gradient counts twice
    grad = torch.randn(B, C, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            for x in (embedding, bank, index, grad)]


def written_out(embedding, bank, index, grad):
    """scores[b, c] = sum_e bank[index[b, c], e] v[b, e]; dv[b] = sum_c grad[b, c] bank[...]."""
    embedding, bank, grad = embedding.double(), bank.double(), grad.double()
    scores = torch.zeros(index.shape, dtype=torch.float64)
    dv = torch.zeros(embedding.shape, dtype=torch.float64)
    for b in range(index.shape[0]):
        for c, row in enumerate(index[b].tolist()):
            scores[b, c] = (bank[row] * embedding[b]).sum()
            dv[b] += grad[b, c] * bank[row]
    return scores, dv


def scored(embedding, bank, index, grad, **kw):
    embedding = embedding.detach().clone().requires_grad_()
    scores = bank_scores(embedding, bank, index, **kw)
    (scores * grad).sum().backward()
    return scores.detach(), embedding.grad


@pytest.mark.parametrize("path", ["whole bank", "chunked"])
def test_torch_paths_equal_the_formula_in_float64(path, monkeypatch):
    embedding, bank, index, grad = make_inputs(B=5, E=12, N=40, C=9)
    # Pick the path by the rule's threshold; pieces of 2 columns cut each row's 9 into 5.
    monkeypatch.setattr(bmod, "WHOLE_BANK_MAX_ROWS_PER_COLUMN", 100 if path == "whole bank" else 1)
    monkeypatch.setattr(bmod, "CHUNK_ELEMENTS", 12 * 2)
    assert bmod.torch_path(40, 9) == path
    scores, dv = scored(embedding, bank, index, grad, impl="torch")
    expected_scores, expected_dv = written_out(embedding, bank, index, grad)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dv, expected_dv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scores, bank_scores_ref(embedding, bank, index), rtol=1e-12,
                               atol=1e-14)
    assert implementations_used()["bank_scores"] == "torch"


def test_the_rule_scores_the_whole_bank_up_to_its_ratio_of_rows_to_columns():
    ratio = bmod.WHOLE_BANK_MAX_ROWS_PER_COLUMN
    assert bmod.torch_path(ratio * 16385, 16385) == "whole bank"
    assert bmod.torch_path(ratio * 16385 + 1, 16385) == "chunked"
    assert bmod.torch_path(50_000, 16385) == "whole bank"  # CIFAR-100's banks
    assert bmod.torch_path(1_281_167, 16385) == "chunked"  # ImageNet's


@pytest.mark.parametrize("rows", [40, 4000])  # whole bank, chunked
def test_a_bank_changed_before_backward_is_refused(rows):
    embedding, bank, index, _ = make_inputs(B=3, E=8, N=rows, C=5)
    embedding.requires_grad_()
    scores = bank_scores(embedding, bank, index, impl="torch")
    bank[index[0, 0]] += 1  # what a refresh before the backward would do
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_the_embedding_takes_the_banks_dtype_and_bad_shapes_are_named():
    embedding, bank, index, _ = make_inputs(B=3, E=8, N=20, C=5)
    assert bank_scores(embedding.float(), bank, index, impl="torch").dtype == torch.float64
    with pytest.raises(ValueError, match=r"bank_scores: expected embedding \(B, E\).*"
                                         r"\(3, 8\), \(20, 7\), \(3, 5\)"):
        bank_scores(embedding, bank[:, :7], index, impl="torch")


@interpreted
def test_kernel_equals_the_formula_under_the_interpreter():
    # C = 37 cuts the interpreter's blocks of 16 columns unevenly; E = 40 its blocks of 32.
    embedding, bank, index, grad = make_inputs(B=3, E=40, N=50, C=37, dtype=torch.float32)
    scores, dv = scored(embedding, bank, index, grad, impl="triton")
    assert implementations_used()["bank_scores"] == "triton"
    expected_scores, expected_dv = written_out(embedding, bank, index, grad)
    assert scores.dtype == dv.dtype == torch.float32
    # fp32 sums of 40 (scores) and 37 (dv) products of unit vectors' entries.
    torch.testing.assert_close(scores.double(), expected_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(dv.double(), expected_dv, rtol=0, atol=1e-5)


@interpreted
def test_kernel_takes_float32_banks_only():
    embedding, bank, index, _ = make_inputs(B=2, E=8, N=10, C=3)
    with pytest.raises(ValueError, match="impl='triton' takes a float32 bank, got torch.float64"):
        bank_scores(embedding, bank, index, impl="triton")


@on_gpu
def test_gpu_kernel_equals_the_reference_at_crd_shapes():
    """ImageNet's CRD shapes but a smaller bank: B 256, C 16,385, E 128."""
    embedding, bank, index, grad = make_inputs(B=256, E=128, N=100_000, C=16385, device="cuda",
                                               dtype=torch.float32)
    scores, dv = scored(embedding, bank, index, grad, impl="auto")
    assert implementations_used()["bank_scores"] == "triton"
    exact_scores, exact_dv = scored(embedding.double(), bank.double(), index, grad.double(),
                                    impl="torch")
    torch.testing.assert_close(scores.double(), exact_scores, rtol=0, atol=2e-6)
    torch.testing.assert_close(dv.double(), exact_dv, rtol=0,
                               atol=1e-4 * exact_dv.abs().max().item())
