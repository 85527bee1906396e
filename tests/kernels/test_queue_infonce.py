"""queue_infonce: the Triton kernels against the float64 reference.

Tolerance rule (flash-attention's): kernel error <= 2 x the torch reference's own error in the
same dtype + a small atol, both measured against the reference run in float64 on the same
(already rounded) inputs. Interpreter tests use small odd shapes (few programs: the interpreter
costs ~0.7 ms per program instance); GPU tests use the training shape.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from markers import interpreted, on_gpu

from cocord_fast.kernels import implementations_used, queue_infonce, queue_infonce_ref

qmod = importlib.import_module("cocord_fast.kernels.queue_infonce")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD = 0.37  # upstream gradient != 1


def make_inputs(B, E, N, dtype, seed=0, device="cpu"):
    """Unit q, queue; keys near q with a per-row noise level, so some rows win and some lose.

    Key i is q_i plus noise n_i of norm ~n_i, so q_i.k_i ~ 1 / sqrt(1 + n_i^2); the best of N
    random unit negatives scores ~ sqrt(2 ln N / E). The noise levels straddle the n at which
    the two meet, at every shape (at E=2048, N=16384 that n is about 10).
    """
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=1)
    tie = max(1.0, E / (2 * math.log(N + 1))) ** 0.5
    noise = torch.linspace(0.15, 2.0, B, dtype=torch.float64)[:, None] * tie
    k = F.normalize(q + noise * torch.randn(B, E, generator=g, dtype=torch.float64) / E ** 0.5,
                    dim=1)
    queue = F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=1)
    return [x.to(device=device, dtype=dtype) for x in (q, k, queue)]


def run(fn, q, k, queue, temperature, **kw):
    q = q.detach().clone().requires_grad_()
    loss, top1 = fn(q, k, queue, temperature, **kw)
    (loss * GRAD).backward()
    return loss.detach(), top1, q.grad


def check(q, k, queue, temperature=0.07, **kw):
    """Loss, top1 and dq of impl='triton' against float64, with the 2x-torch-error rule.

    atol: 1e-6 on the loss (~1 ulp at its scale, log N), 1e-5 x max|dq| on dq.
    """
    exact = run(queue_infonce_ref, q.double(), k.double(), queue.double(), temperature)
    torch_ = run(queue_infonce_ref, q, k, queue, temperature)
    kernel = run(queue_infonce, q, k, queue, temperature, impl="triton", **kw)
    assert kernel[0].dtype == torch_[0].dtype == torch.float32
    assert kernel[1].dtype == torch.float32 and not kernel[1].requires_grad
    assert kernel[2].dtype == q.dtype and kernel[2].shape == q.shape
    err = lambda x, ref: (x.double() - ref).abs().max().item()  # noqa: E731
    assert err(kernel[0], exact[0]) <= 2 * err(torch_[0], exact[0]) + 1e-6
    grad_atol = 1e-5 * exact[2].abs().max().item()
    assert err(kernel[2], exact[2]) <= 2 * err(torch_[2], exact[2]) + grad_atol
    # top1 counts winning rows; only a row within rounding of a tie may be counted differently.
    with torch.no_grad():
        qd, kd, nd = q.double(), k.double(), queue.double()
        margin = ((qd * kd).sum(1) - (qd @ nd.T).max(1).values) / temperature  # (B,)
    wins = lambda top1: round(top1.item() * len(q))  # noqa: E731
    assert abs(wins(kernel[1]) - wins(exact[1])) <= (margin.abs() < 1e-4).sum().item()
    assert 0 < wins(exact[1]) < len(q) or len(q) < 4  # the data has wins and losses


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 33, 77), (1, 16, 1), (37, 70, 130)], ids=str)
def test_matches_float64_reference(shape, dtype):
    B, E, N = shape
    check(*make_inputs(B, E, N, dtype, seed=B + E + N))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_in_chunks_of_the_queue(dtype, monkeypatch):
    """A small softmax scratch: the backward walks the queue in 3 chunks of 32 rows."""
    monkeypatch.setattr(qmod, "P_CHUNK_ELEMENTS", 5 * 32)
    check(*make_inputs(5, 33, 77, dtype, seed=1))


@interpreted
@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 16), (torch.float16, 22)], ids=str)
def test_16bit_dq_before_rounding(dtype, bits):
    """P @ queue runs on 16-bit operands with P split into two terms (bf16: 16 bits of P; fp16:
    22): the fp32 sum that is then rounded to q's dtype (8 or 11 bits) has that accuracy."""
    q, k, queue = make_inputs(5, 33, 77, dtype, seed=6)
    exact = run(queue_infonce_ref, q.double(), k.double(), queue.double(), 0.07)[2]
    torch32 = run(queue_infonce_ref, q.float(), k.float(), queue.float(), 0.07)[2]
    _, _, lse, pos = qmod._forward(q, k, queue, 0.07)
    dq32 = qmod._backward(q, k, queue, lse, pos, 0.07, torch.tensor(GRAD),
                          out_dtype=torch.float32)
    err = lambda x: (x.double() - exact).abs().max().item()  # noqa: E731
    assert err(dq32) <= 2 * err(torch32) + 2.0 ** (2 - bits) * exact.abs().max().item()


@interpreted
def test_many_splits_are_merged(monkeypatch):
    """40 splits of the queue: the merge of partial (max, sum-exp) runs over two chunks of 32."""
    monkeypatch.setattr(qmod, "INTERPRET_SPLITS", 40)
    check(*make_inputs(6, 16, 40 * 32 + 5, torch.float32, seed=7))


@interpreted
def test_wins_and_losses_and_ties():
    """Exact small vectors: row 0's positive ties its best negative (a win), row 1 loses."""
    e = torch.eye(16)
    q = torch.stack([e[0], e[1]])
    k = torch.stack([e[0], 0.5 * e[1] + 0.5 * e[2]])
    queue = torch.stack([e[0], e[1], e[3]])  # row 0 ties with queue[0]; row 1 loses to queue[1]
    _, top1 = queue_infonce_ref(q, k, queue, 0.1)
    loss, top1_kernel = queue_infonce(q, k, queue, 0.1, impl="triton")
    assert top1.item() == top1_kernel.item() == 0.5
    torch.testing.assert_close(loss, queue_infonce_ref(q, k, queue, 0.1)[0])


@interpreted
def test_mixed_dtypes_compute_in_the_widest():
    q, k, queue = make_inputs(5, 33, 77, torch.float32, seed=2)
    queue = queue.bfloat16()
    loss, top1 = queue_infonce(q, k, queue, 0.1, impl="triton")
    ref_loss, ref_top1 = queue_infonce_ref(q, k, queue, 0.1)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert top1.item() == ref_top1.item()


@interpreted
def test_strided_query_and_autocast():
    q, k, queue = make_inputs(6, 40, 50, torch.float32, seed=3)
    q_strided = q.T.contiguous().T  # same values, column-major
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = queue_infonce(q_strided, k, queue, 0.2, impl="triton")
    torch.testing.assert_close(loss, queue_infonce_ref(q, k, queue, 0.2)[0], rtol=1e-6, atol=1e-6)



# Dispatch: pure torch, no kernel runs.

def test_torch_and_auto_on_cpu_are_the_reference():
    q, k, queue = make_inputs(4, 8, 9, torch.float32)
    expected = queue_infonce_ref(q, k, queue, 0.1)
    for impl in ("torch", "auto"):
        got = queue_infonce(q, k, queue, 0.1, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_float64_stays_float64_on_the_torch_path():
    q, k, queue = make_inputs(4, 8, 9, torch.float64)
    loss, top1 = queue_infonce(q, k, queue, 0.1)
    assert loss.dtype == top1.dtype == torch.float64


def test_clear_errors():
    q, k, queue = make_inputs(4, 8, 9, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        queue_infonce(q, k, queue, 0.1, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        queue_infonce(q, k, queue, 0.0)
    with pytest.raises(ValueError, match="float64"):
        queue_infonce(q.double(), k.double(), queue.double(), 0.1, impl="triton")
    with pytest.raises(ValueError, match="requiring grad"):
        queue_infonce(q, k.requires_grad_(), queue, 0.1, impl="triton")
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        queue_infonce(q, k.detach(), queue[:, :4], 0.1, impl="triton")


# GPU: compiled kernels, autotuned configs, the training shape.

@interpreted
def test_auto_on_device_tensors_runs_the_kernel_for_16_bit_inputs_only(monkeypatch):
    """Where auto would pick Triton (CUDA tensors; here the interpreter stands in): bf16 runs
    the kernel, fp32 the reference unless TF32 is allowed, float64 the reference."""
    monkeypatch.setattr(qmod, "use_triton", lambda impl, tensors, op: True)
    expected = {torch.bfloat16: "triton", torch.float32: "torch", torch.float64: "torch"}
    for dtype, implementation in expected.items():
        queue_infonce(*make_inputs(5, 33, 77, dtype), 0.1, impl="auto")
        assert implementations_used()["queue_infonce"] == implementation, dtype
    monkeypatch.setattr(qmod, "_fp32_precision", lambda: "tf32")
    queue_infonce(*make_inputs(5, 33, 77, torch.float32), 0.1, impl="auto")
    assert implementations_used()["queue_infonce"] == "triton"


@on_gpu
def test_gpu_auto_takes_the_reference_for_what_the_kernel_lacks():
    """On CUDA, auto must still give k its gradient when k requires one."""
    q, k, queue = make_inputs(4, 8, 9, torch.bfloat16, device="cuda")
    k = k.requires_grad_()
    loss, _ = queue_infonce(q, k, queue, 0.1, impl="auto")
    assert implementations_used()["queue_infonce"] == "torch"
    loss.backward()
    assert k.grad is not None
    # fp32 without TF32 (torch's default): the reference, whose GEMMs beat tf32x3 dots.
    queue_infonce(*make_inputs(4, 8, 9, torch.float32, device="cuda"), 0.1)
    assert implementations_used()["queue_infonce"] == "torch"


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_training_shape(dtype):
    q, k, queue = make_inputs(256, 2048, 16384, dtype, seed=4, device="cuda")
    check(q, k, queue, temperature=0.07)


@on_gpu
@pytest.mark.parametrize("shape", [(5, 33, 77), (300, 130, 1000), (256, 2048, 65536)], ids=str)
def test_gpu_odd_and_chunked_shapes(shape):
    """(256, 2048, 65536): the backward walks the queue in two chunks of the softmax scratch."""
    B, E, N = shape
    check(*make_inputs(B, E, N, torch.bfloat16, seed=5, device="cuda"))


@on_gpu
def test_gpu_auto_dispatches_to_the_kernel_without_host_sync():
    q, k, queue = make_inputs(64, 128, 4096, torch.bfloat16, device="cuda")
    expected = run(queue_infonce_ref, q, k, queue, 0.1)
    q.requires_grad_()
    queue_infonce(q, k, queue, 0.1)[0].backward()  # the first call autotunes (and syncs)
    q.grad = None
    implementations_used(reset=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.cuda.set_sync_debug_mode("error")  # any host sync in forward/backward raises
        try:
            loss, top1 = queue_infonce(q, k, queue, 0.1)
            (loss * GRAD).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    assert implementations_used()["queue_infonce"] == "triton"
    kernels = {event.name for event in profile.events()
               if event.device_type == torch.autograd.DeviceType.CUDA}
    for kernel in ("fwd_partial", "fwd_combine", "bwd_probs", "bwd_dq"):
        assert any(kernel in name for name in kernels), kernels
    assert torch.allclose(loss, expected[0], rtol=1e-5)  # bf16 products are exact in fp32
    assert torch.allclose(q.grad.float(), expected[2].float(), rtol=2 ** -7, atol=1e-6)


def test_the_gpu_tests_data_has_wins_and_losses_at_training_shapes():
    """The precondition of the training-shape tests, checked here in float64 on the CPU."""
    for B, E, N, seed in [(256, 2048, 16384, 4), (256, 2048, 65536, 5), (300, 130, 1000, 5)]:
        q, k, queue = make_inputs(B, E, N, torch.float64, seed=seed)
        _, top1 = queue_infonce_ref(q, k, queue, 0.07)
        assert 0.1 < top1.item() < 0.9, (B, E, N, top1.item())
