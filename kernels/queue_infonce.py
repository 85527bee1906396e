"""InfoNCE of queries against their positive key and a queue of negatives (METHOD.md's L_ctr),
fused: the (B, N+1) logits never exist in global memory.

    loss = mean_i [ logsumexp_j(l_ij) - l_i0 ],  l_i0 = q_i.k_i / t,  l_ij = q_i.queue_(j-1) / t
    top1 = mean_i [ l_i0 >= max_j>0 l_ij ]       (detached; ties count as wins)
    dq_i = g * (sum_j softmax_ij [k; queue]_j - k_i) / (t * B)

Kernels (Triton; grid axis 0 varies fastest, so programs that share a queue tile run together
and the tile is read from HBM about once):
  forward   `fwd_partial`   grid (row blocks, N splits): each program owns BLOCK_B rows of q and a
            range of the queue, streams BLOCK_N x E queue tiles (E in BLOCK_E chunks, tl.dot with
            an fp32 accumulator) and keeps an online (max, sum-exp) per row. The split over N
            gives the GPU enough programs when B is small. The programs of split 0 also compute
            the positive logit.
            `fwd_combine`   one program: merges the splits' (max, sum-exp) with the positive,
            writes the row logsumexp (kept for backward), the mean loss and top1.
  backward  `bwd_probs`     grid (row blocks, column tiles of a chunk of the queue): recomputes
            the logits and writes P = softmax (fp32) for that chunk (at most P_CHUNK_ELEMENTS).
            `bwd_dq`        grid (E blocks, row blocks, K splits): dq partials = P @ queue_chunk,
            plus (p0 - 1) k once, times g / (t B); the partials are summed in torch.
            Two passes because E (2048) is too wide for a BLOCK_B x E accumulator in registers;
            P lives only per chunk, and costs less than recomputing the logits per E block.

Precision. bf16 x bf16 and fp16 x fp16 products are exact in fp32 and tl.dot accumulates in fp32,
so the logits of 16-bit inputs are as good as the reference's fp32 ones. For P @ queue, P (fp32)
is split into two 16-bit terms (bf16: 16 bits of P; fp16: 22 bits of P * 2^15, which keeps the
low term out of fp16's subnormals) on 16-bit tensor cores: the product's error (<= 2^-17
relative) stays far below the rounding of dq to q's 16-bit dtype (2^-9, 2^-11), so dq comes out
as the fp32 reference's, rounded. fp32 inputs use tl.dot's "tf32x3" (about fp32 accuracy on
tensor cores; exact fp32 FMA with FP32_DOT_PRECISION = "ieee"), or plain "tf32" when torch itself
is allowed TF32 matmuls (then the reference is TF32 too). float64 runs the torch reference.
"""
import functools

import torch
from torch import Tensor

from ._dispatch import interpreting, record, use_triton
from ._launch import cdiv, programs_wanted

# "tf32x3": three TF32 tensor-core products, close to fp32 (the dropped lo*lo term is ~2^-22
# relative, below fp32's accumulation error over E terms). "ieee" is exact fp32 FMA, slower.
FP32_DOT_PRECISION = "tf32x3"
# The backward's softmax scratch holds at most this many fp32 values (B x chunk of the queue).
P_CHUNK_ELEMENTS = 1 << 23
# Splits of the queue per row block under the interpreter (on a GPU: enough to fill it).
INTERPRET_SPLITS = 2
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def queue_infonce_ref(q: Tensor, k: Tensor, queue: Tensor,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """The semantics (pure torch): q, k (B, E), queue (N, E) -> (loss, top1), both 0-dim.

    Computed in at least fp32 (float64 stays float64) with autocast off: bf16 keeps ~3
    significant digits of q.k, which divided by temperature 0.1 would move logits by ~0.04.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, queue.dtype), torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        positive = (q * k).sum(dim=1)  # (B,)
        negative = q @ queue.T  # (B, N)
        logits = torch.cat([positive[:, None], negative], dim=1) / temperature  # (B, N+1)
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    with torch.no_grad():
        top1 = (positive >= negative.max(dim=1).values).to(dtype).mean()
    return loss, top1


def _reference(q: Tensor, k: Tensor, queue: Tensor,
               temperature: float) -> tuple[Tensor, Tensor]:
    """`queue_infonce_ref`, noted in the run log's record of what ran."""
    record("queue_infonce", "torch")
    return queue_infonce_ref(q, k, queue, temperature)


def queue_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float,
                  impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Mean InfoNCE loss of each query against its own key and every queue row, and top1.

    q: (B, E) L2-normalised queries (may require grad); k: (B, E) positive keys; queue: (N, E)
    negatives. k and queue get no gradient, and queue must not change before backward (pass a
    snapshot: backward reads it again). Returns (loss, top1): 0-dim, at least fp32; top1 is the
    detached fraction of rows whose positive logit is >= every negative logit.

    impl: "auto" (Triton on CUDA tensors, torch otherwise), "triton" (also on CPU tensors under
    TRITON_INTERPRET=1) or "torch" (`queue_infonce_ref`). Auto also takes the reference for
    float64, for float32 unless torch allows TF32 matmuls (cuBLAS is faster there), and when k
    or queue requires grad, which the kernel does not produce.
    """
    if temperature <= 0:
        raise ValueError(f"queue_infonce: temperature must be > 0, got {temperature}")
    if not use_triton(impl, [q, k, queue], "queue_infonce"):
        return _reference(q, k, queue, temperature)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), queue.dtype)
    unsupported = None
    if dtype not in _SUPPORTED:
        unsupported = f"dtype {dtype} (the kernel takes float32, bfloat16, float16)"
    elif torch.is_grad_enabled() and (k.requires_grad or queue.requires_grad):
        unsupported = "k or queue requiring grad (the kernel returns dq only)"
    if unsupported:
        if impl == "auto":
            return _reference(q, k, queue, temperature)
        raise ValueError(f"queue_infonce: impl='triton' does not support {unsupported}")
    if impl == "auto" and dtype == torch.float32 and _fp32_precision() != "tf32":
        # fp32 at fp32 accuracy: the reference's cuBLAS GEMMs were faster on an H100 (measured
        # 2026-11-26 at 3fbe756, fwd+bwd at B=256 E=2048 N=16384: 0.912 ms against the
        # kernel's 1.107 ms with tf32x3 dots).
        return _reference(q, k, queue, temperature)
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue_infonce: expected q, k (B, E) and queue (N, E), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}")
    if q.shape[0] == 0 or queue.shape[0] == 0:
        raise ValueError(f"queue_infonce: empty batch or queue ({tuple(q.shape)}, "
                         f"{tuple(queue.shape)})")
    record("queue_infonce", "triton")
    # Casts outside the Function: autograd casts dq back to q's dtype.
    return _QueueInfoNCE.apply(q.to(dtype).contiguous(), k.detach().to(dtype).contiguous(),
                               queue.detach().to(dtype).contiguous(), float(temperature))


class _QueueInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, queue: Tensor, temperature: float):
        loss, top1, lse, pos = _forward(q, k, queue, temperature)
        # Only (B,) row statistics are kept; backward recomputes the logits from q and queue.
        # Saving queue also makes autograd refuse a backward after an in-place change to it.
        ctx.save_for_backward(q, k, queue, lse, pos)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(top1)
        return loss, top1

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_top1: Tensor):
        q, k, queue, lse, pos = ctx.saved_tensors
        dq = _backward(q, k, queue, lse, pos, ctx.temperature, grad_loss)
        return dq, None, None, None


# ---------------------------------------------------------------------------------------------
# Launch parameters. Under the interpreter every program instance costs ~0.7 ms of Python, so it
# gets a single small config (blocks of 32 still satisfy tl.dot's minimum of 16 on GPUs) and
# INTERPRET_SPLITS splits, enough to exercise every mask and merge.

def _splits(length: int, tiles: int, unit: int, device: torch.device) -> tuple[int, int]:
    """(splits, length per split): cut `length` into ranges of a multiple of `unit` (so no
    split cuts a tile) such that `tiles` x splits programs fill the GPU."""
    wanted = (cdiv(programs_wanted(device), tiles) if device.type == "cuda"
              else INTERPRET_SPLITS)
    wanted = max(1, min(wanted, cdiv(length, unit)))
    per = cdiv(cdiv(length, wanted), unit) * unit
    return cdiv(length, per), per


def _fp32_precision() -> str:
    matmul = torch.backends.cuda.matmul
    tf32 = getattr(matmul, "fp32_precision", None) == "tf32" or (
        getattr(matmul, "fp32_precision", None) in (None, "none") and matmul.allow_tf32)
    return "tf32" if tf32 else FP32_DOT_PRECISION


def _dot_options(dtype: torch.dtype) -> dict:
    """tl.dot precision, and how P is split for the P @ queue product (see the module doc)."""
    if dtype == torch.float32:
        return dict(PRECISION=_fp32_precision(), TERMS=1, SCALE=1.0)
    if dtype == torch.bfloat16:
        return dict(PRECISION="tf32", TERMS=2, SCALE=1.0)
    return dict(PRECISION="tf32", TERMS=2, SCALE=32768.0)  # fp16: keep P's low bits normal


def _forward(q: Tensor, k: Tensor, queue: Tensor, temperature: float):
    """(loss, top1, lse, pos): the means, and per row the logsumexp and the positive logit."""
    K = _kernels()
    (B, E), N = q.shape, queue.shape[0]
    small = interpreting()
    # Split units: the largest BLOCK_N of the configs, so that no split cuts a tile.
    split, per = _splits(N, cdiv(B, 32 if small else 64), 32 if small else 128, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    pos, lse = torch.empty(B, **f32), torch.empty(B, **f32)  # (B,) each
    row_max, row_sum = torch.empty(split, B, **f32), torch.empty(split, B, **f32)  # (S, B)
    loss, top1 = torch.empty((), **f32), torch.empty((), **f32)
    K.fwd_partial[lambda meta: (cdiv(B, meta["BLOCK_B"]), split)](
        q, k, queue, pos, row_max, row_sum, B, N, E, per, temperature,
        q.stride(0), k.stride(0), queue.stride(0),
        PRECISION=_dot_options(q.dtype)["PRECISION"], UPCAST=small)
    K.fwd_combine[(1,)](pos, row_max, row_sum, lse, loss, top1, B, split,
                        BLOCK_R=128, BLOCK_S=32, num_warps=4)
    return loss, top1, lse, pos


def _backward(q: Tensor, k: Tensor, queue: Tensor, lse: Tensor, pos: Tensor,
              temperature: float, grad_loss: Tensor, out_dtype: torch.dtype | None = None):
    """dq (B, E) in q's dtype (or out_dtype: tests read the fp32 sum before rounding), for the
    upstream gradient grad_loss (0-dim, stays on the device)."""
    K = _kernels()
    (B, E), N = q.shape, queue.shape[0]
    small = interpreting()
    opts = _dot_options(q.dtype)
    unit = 32 if small else 64  # the largest BLOCK_K of the configs
    chunk = min(N, max(unit, P_CHUNK_ELEMENTS // B // unit * unit))
    chunks = cdiv(N, chunk)
    out_tiles = cdiv(E, 32 if small else 128) * cdiv(B, 32 if small else 64)
    split, per = _splits(chunk, out_tiles, unit, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    probs = torch.empty(B, chunk, **f32)  # (B, chunk): the softmax of one queue chunk
    partial = torch.empty(chunks * split, B, E, **f32)  # (chunks * splits, B, E)
    grad = grad_loss.detach().to(torch.float32).reshape(1)  # read in-kernel: no host sync
    for c in range(chunks):
        part = queue[c * chunk:(c + 1) * chunk]  # (width, E), a view: no copy
        width = part.shape[0]
        K.bwd_probs[lambda meta: (cdiv(B, meta["BLOCK_B"]), cdiv(width, meta["BLOCK_N"]))](
            q, part, lse, probs, B, width, E, temperature,
            q.stride(0), part.stride(0), probs.stride(0),
            PRECISION=opts["PRECISION"], UPCAST=small)
        K.bwd_dq[lambda meta: (cdiv(E, meta["BLOCK_EO"]), cdiv(B, meta["BLOCK_M"]), split)](
            probs, part, k, lse, pos, grad, partial[c * split:], B, E, width, per,
            temperature, probs.stride(0), part.stride(0), k.stride(0),
            FIRST=c == 0, UPCAST=small, **opts)
    dq = partial[0] if len(partial) == 1 else partial.sum(dim=0)  # (B, E)
    return dq.to(out_dtype or q.dtype)


@functools.cache
def _kernels():
    """Defines the Triton kernels on first use, so importing this module needs no triton.

    The kernels' names are module globals (not closures): the interpreter re-executes a
    kernel's source against its module's globals only.
    """
    global triton, tl, _dot, _logit_tile, fwd_partial, fwd_combine, bwd_probs, bwd_dq
    import triton
    import triton.language as tl
    from types import SimpleNamespace

    if interpreting():  # the autotuner needs a GPU to time configs: one config
        tile_configs = [triton.Config({"BLOCK_B": 32, "BLOCK_N": 32, "BLOCK_E": 32})]
        gemm_configs = [triton.Config({"BLOCK_M": 32, "BLOCK_EO": 32, "BLOCK_K": 32})]
    else:
        # BLOCK_N <= 128 and BLOCK_K <= 64 (the split units above); BLOCK_B, BLOCK_M >= 64.
        tile_configs = [triton.Config({"BLOCK_B": b, "BLOCK_N": n, "BLOCK_E": e},
                                      num_warps=w, num_stages=s)
                        for b, n, e, w, s in [(64, 128, 64, 4, 3), (64, 128, 64, 8, 4),
                                              (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                                              (64, 64, 128, 4, 3), (128, 128, 32, 8, 4)]]
        gemm_configs = [triton.Config({"BLOCK_M": m, "BLOCK_EO": e, "BLOCK_K": kk},
                                      num_warps=w, num_stages=s)
                        for m, e, kk, w, s in [(64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
                                               (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                                               (128, 128, 64, 8, 3)]]

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # The interpreter multiplies bf16 as raw uint16 bits: upcast there (exact, since
        # 16-bit products are exact in fp32); on the GPU use the 16-bit tensor cores.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _logit_tile(q_ptr, queue_ptr, rows, row_ok, cols, col_ok, E, stride_q, stride_queue,
                    temperature, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """(BLOCK_B, BLOCK_N) fp32 logits q[rows] . queue[cols]^T / t (E in BLOCK_E chunks)."""
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
        n_rows = queue_ptr + cols.to(tl.int64)[:, None] * stride_queue
        for e0 in range(0, E, BLOCK_E):
            ec = e0 + tl.arange(0, BLOCK_E)
            e_ok = ec < E
            qt = tl.load(q_rows + ec[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
            nt = tl.load(n_rows + ec[None, :], mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc = _dot(qt, tl.trans(nt), acc, PRECISION, UPCAST)
        return acc / temperature

    @triton.autotune(configs=tile_configs, key=["B", "N", "E"])
    @triton.jit
    def fwd_partial(q_ptr, k_ptr, queue_ptr, pos_ptr, max_ptr, sum_ptr, B, N, E, per_split,
                    temperature, stride_q, stride_k, stride_queue,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        if pid_s == 0:  # the positive logit, once per row: sum(q * k) in fp32
            pos = tl.zeros([BLOCK_B], dtype=tl.float32)
            for e0 in range(0, E, BLOCK_E):
                ec = e0 + tl.arange(0, BLOCK_E)
                m = row_ok[:, None] & (ec < E)[None, :]
                qv = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + ec[None, :],
                             mask=m, other=0.0)
                kv = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + ec[None, :],
                             mask=m, other=0.0)
                pos += tl.sum(qv.to(tl.float32) * kv.to(tl.float32), axis=1)
            tl.store(pos_ptr + rows, pos / temperature, mask=row_ok)
        start = pid_s * per_split
        end = tl.minimum(start + per_split, N)
        run_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            logits = _logit_tile(q_ptr, queue_ptr, rows, row_ok, cols, col_ok, E, stride_q,
                                 stride_queue, temperature, BLOCK_B, BLOCK_N, BLOCK_E,
                                 PRECISION, UPCAST)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            # Every tile has a valid column, so new_max is finite and exp(-inf - new_max) = 0.
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
                tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
        tl.store(max_ptr + pid_s * B + rows, run_max, mask=row_ok)
        tl.store(sum_ptr + pid_s * B + rows, run_sum, mask=row_ok)

    @triton.jit
    def fwd_combine(pos_ptr, max_ptr, sum_ptr, lse_ptr, loss_ptr, top1_ptr, B, SPLIT,
                    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
        # One program: the partials are (splits x B) floats, a few hundred kB at most, and
        # one program can write the means without atomics (deterministic).
        loss_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        win_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, B, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < B
            pos = tl.load(pos_ptr + rows, mask=ok, other=0.0)
            big = pos  # running max over the positive and the splits
            total = tl.full([BLOCK_R], 1.0, dtype=tl.float32)  # exp(pos - big)
            neg_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            for s0 in range(0, SPLIT, BLOCK_S):
                sp = s0 + tl.arange(0, BLOCK_S)
                m = (sp < SPLIT)[:, None] & ok[None, :]
                offs = sp[:, None] * B + rows[None, :]
                part_max = tl.load(max_ptr + offs, mask=m, other=float("-inf"))
                part_sum = tl.load(sum_ptr + offs, mask=m, other=0.0)
                chunk_max = tl.max(part_max, axis=0)
                neg_max = tl.maximum(neg_max, chunk_max)
                new_big = tl.maximum(big, chunk_max)
                total = total * tl.exp(big - new_big) + tl.sum(
                    part_sum * tl.exp(part_max - new_big[None, :]), axis=0)
                big = new_big
            lse = big + tl.log(total)
            tl.store(lse_ptr + rows, lse, mask=ok)
            loss_acc += tl.where(ok, lse - pos, 0.0)
            win_acc += tl.where(ok & (pos >= neg_max), 1.0, 0.0)
        tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / B)
        tl.store(top1_ptr, tl.sum(win_acc, axis=0) / B)

    @triton.autotune(configs=tile_configs, key=["B", "WIDTH", "E"])
    @triton.jit
    def bwd_probs(q_ptr, queue_ptr, lse_ptr, p_ptr, B, WIDTH, E, temperature,
                  stride_q, stride_queue, stride_p,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the chunk
        row_ok = rows < B
        col_ok = cols < WIDTH
        logits = _logit_tile(q_ptr, queue_ptr, rows, row_ok, cols, col_ok, E, stride_q,
                             stride_queue, temperature, BLOCK_B, BLOCK_N, BLOCK_E, PRECISION,
                             UPCAST)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        probs = tl.exp(logits - lse[:, None])
        tl.store(p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :], probs,
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.autotune(configs=gemm_configs, key=["B", "E", "WIDTH"])
    @triton.jit
    def bwd_dq(p_ptr, queue_ptr, k_ptr, lse_ptr, pos_ptr, grad_ptr, out_ptr, B, E, WIDTH,
               per_split, temperature, stride_p, stride_queue, stride_k,
               FIRST: tl.constexpr, PRECISION: tl.constexpr, TERMS: tl.constexpr,
               SCALE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_EO: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_k = tl.program_id(2)
        ec = tl.program_id(0) * BLOCK_EO + tl.arange(0, BLOCK_EO)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        e_ok = ec < E
        row_ok = rows < B
        k_end = tl.minimum((pid_k + 1) * per_split, WIDTH)
        acc = tl.zeros([BLOCK_M, BLOCK_EO], dtype=tl.float32)
        p_rows = p_ptr + rows.to(tl.int64)[:, None] * stride_p
        for k0 in range(pid_k * per_split, k_end, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end
            p = tl.load(p_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(queue_ptr + kk.to(tl.int64)[:, None] * stride_queue + ec[None, :],
                        mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            # fp32 P on 16-bit tensor cores: P * SCALE ~ hi + lo, both in v's dtype.
            p = p * SCALE
            hi = p.to(v.dtype)
            acc = _dot(hi, v, acc, PRECISION, UPCAST)
            if TERMS == 2:
                acc = _dot((p - hi.to(tl.float32)).to(v.dtype), v, acc, PRECISION, UPCAST)
        acc = acc * (1.0 / SCALE)
        if FIRST:
            if pid_k == 0:  # the positive's column of the softmax, minus the one-hot target
                lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
                pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
                kv = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + ec[None, :],
                             mask=row_ok[:, None] & e_ok[None, :], other=0.0)
                acc += (tl.exp(pos - lse) - 1.0)[:, None] * kv.to(tl.float32)
        coef = tl.load(grad_ptr) / (temperature * B)
        out = out_ptr + pid_k.to(tl.int64) * B * E + rows.to(tl.int64)[:, None] * E + ec[None, :]
        tl.store(out, acc * coef, mask=row_ok[:, None] & e_ok[None, :])

    return SimpleNamespace(fwd_partial=fwd_partial, fwd_combine=fwd_combine,
                           bwd_probs=bwd_probs, bwd_dq=bwd_dq)

