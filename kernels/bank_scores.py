"""Scores of embeddings against memory-bank rows picked by index (CRD's score, METHOD.md
section 2), without the (B, C, E) tensor of gathered rows.

    scores[b, c] = <bank[index[b, c]], v[b]>            (B, C)
    dv[b]        = sum_c g[b, c] bank[index[b, c]]       (B, E); the bank gets no gradient

Gathering the rows first (`bank_scores_ref`, what RepDistiller does) writes B x C x E floats,
reads them back for the product and keeps them for backward: 537 MB a bank at CRD's shapes
(B 64, C = K + 1 = 16,385, E 128), 2.1 GB at B 256. The implementations here never hold them:

  triton       (CUDA) `gather_dot`: each program reads its row's C-tile of bank rows by index
               and reduces it against v[b] in fp32; backward `gather_weighted_sum` accumulates
               g x rows the same way, per split of C (partials summed in torch).
  whole bank   (torch) v @ bank^T, then the C columns picked: B x N x E multiply-adds at GEMM
               speed; backward scatters g into (B, N) and multiplies by the bank.
  chunked      (torch) each row's picked rows gathered in pieces that stay in cache, each
               times v[b]; backward is one `embedding_bag` (weighted by g), which never
               writes gathered rows.

Which torch path runs is a rule on the shapes (`WHOLE_BANK_MAX_ROWS_PER_COLUMN`): a GEMM's
multiply-add costs far less than a row read at random, so scoring every row of the bank wins
until the bank has several times C rows.

The bank is read again in backward, so it must not change in between (autograd refuses a
backward after an in-place change): CRD refreshes its banks after the backward pass.
"""
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import interpreting, record, use_triton
from ._launch import cdiv, programs_wanted

# The torch path scores the whole bank while it has at most this many rows per picked column
# (N <= this x C); past it, the chunked gather. Measured on 2 CPU cores (bench/bank_scores.py:
# B 64, C 16,385, E 128, forward and backward; bench/results/bank_scores_*.json), where the two
# crossed between N = 6 C (100,000 rows: 33 against 98 ms) and N = 12 C (200,000 rows: 91
# against 85 ms).
WHOLE_BANK_MAX_ROWS_PER_COLUMN = 8
# The chunked gather's pieces of rows: at most this many elements (1 MB of fp32).
CHUNK_ELEMENTS = 1 << 18
# Splits of C per row in the Triton backward under the interpreter (on a GPU: enough to fill it).
INTERPRET_SPLITS = 2


def bank_scores_ref(embedding: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """The semantics (pure torch): embedding (B, E), bank (N, E), index (B, C) -> (B, C), by
    gathering the (B, C, E) rows."""
    return torch.bmm(bank[index], embedding.unsqueeze(2)).squeeze(2)


def torch_path(num_rows: int, num_columns: int) -> str:
    """"whole bank" or "chunked": the torch path for a bank of `num_rows` rows scored at
    `num_columns` picked rows per embedding."""
    return ("whole bank" if num_rows <= WHOLE_BANK_MAX_ROWS_PER_COLUMN * num_columns
            else "chunked")


def bank_scores(embedding: Tensor, bank: Tensor, index: Tensor, impl: str = "auto") -> Tensor:
    """<bank[index[b, c]], embedding[b]> for every b, c: (B, C) in the bank's dtype.

    embedding (B, E) may require grad; bank (N, E) gets none and must not change before
    backward; index (B, C) int64 rows of the bank. The embedding is cast to the bank's dtype.

    impl: "auto" (Triton on CUDA tensors, torch otherwise), "triton" (also on CPU tensors under
    TRITON_INTERPRET=1) or "torch" (whole bank or chunked gather, by `torch_path`). The kernel
    takes float32 banks; auto runs torch for others.
    """
    if embedding.dim() != 2 or bank.dim() != 2 or index.dim() != 2 or (
            embedding.shape[1] != bank.shape[1] or index.shape[0] != embedding.shape[0]):
        raise ValueError(f"bank_scores: expected embedding (B, E), bank (N, E) and index "
                         f"(B, C), got {tuple(embedding.shape)}, {tuple(bank.shape)}, "
                         f"{tuple(index.shape)}")
    embedding, bank = embedding.to(bank.dtype), bank.detach()
    if use_triton(impl, [embedding, bank, index], "bank_scores"):
        if bank.dtype == torch.float32:
            record("bank_scores", "triton")
            return _TritonBankScores.apply(embedding, bank.contiguous(), index.contiguous())
        if impl == "triton":
            raise ValueError(f"bank_scores: impl='triton' takes a float32 bank, got {bank.dtype}")
    record("bank_scores", "torch")
    if torch_path(bank.shape[0], index.shape[1]) == "whole bank":
        return _WholeBankScores.apply(embedding, bank, index)
    return _ChunkedScores.apply(embedding, bank, index)


class _WholeBankScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embedding: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(bank, index)
        return torch.mm(embedding, bank.T).gather(1, index)  # (B, N) -> (B, C)

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, index = ctx.saved_tensors
        spread = grad.new_zeros(index.shape[0], bank.shape[0]).scatter_add_(1, index, grad)
        return torch.mm(spread, bank), None, None  # (B, N) @ (N, E)


class _ChunkedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embedding: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(bank, index)
        (batch, columns), width = index.shape, bank.shape[1]
        piece = max(1, CHUNK_ELEMENTS // width)
        scores = embedding.new_empty(batch, columns)
        for b in range(batch):
            for start in range(0, columns, piece):
                # index_select copies whole rows (advanced indexing was 3x slower here).
                rows = bank.index_select(0, index[b, start:start + piece])  # (piece, E)
                torch.mv(rows, embedding[b], out=scores[b, start:start + piece])
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, index = ctx.saved_tensors
        return F.embedding_bag(index, bank, per_sample_weights=grad.contiguous(),
                               mode="sum"), None, None


class _TritonBankScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embedding: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        embedding = embedding.contiguous()
        ctx.save_for_backward(bank, index)
        (batch, columns), width = index.shape, bank.shape[1]
        scores = torch.empty(batch, columns, device=bank.device, dtype=torch.float32)
        _kernels().gather_dot[lambda meta: (batch, cdiv(columns, meta["BLOCK_C"]))](
            embedding, bank, index, scores, columns, width, bank.stride(0))
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, index = ctx.saved_tensors
        grad = grad.contiguous()
        (batch, columns), width = index.shape, bank.shape[1]
        splits = (INTERPRET_SPLITS if interpreting()
                  else max(1, min(cdiv(programs_wanted(bank.device), batch), columns // 1024)))
        per_split = cdiv(columns, splits)
        partial = torch.empty(splits, batch, width, device=bank.device, dtype=torch.float32)
        _kernels().gather_weighted_sum[lambda meta: (batch, splits, cdiv(width,
                                                                         meta["BLOCK_E"]))](
            grad, bank, index, partial, columns, width, per_split, bank.stride(0))
        return partial.sum(dim=0), None, None


@functools.cache
def _kernels():
    """Defines the Triton kernels on first use, so importing this module needs no triton (their
    names are module globals: the interpreter re-executes a kernel against its module's)."""
    global triton, tl, gather_dot, gather_weighted_sum
    import triton
    import triton.language as tl
    from types import SimpleNamespace

    if interpreting():  # the autotuner needs a GPU to time configs: one config
        configs = [triton.Config({"BLOCK_C": 16, "BLOCK_E": 32})]
    else:
        configs = [triton.Config({"BLOCK_C": c, "BLOCK_E": e}, num_warps=w)
                   for c, e, w in [(32, 128, 4), (64, 128, 4), (128, 128, 8), (64, 64, 4),
                                   (128, 64, 4), (256, 64, 8)]]

    @triton.autotune(configs=configs, key=["C", "E"])
    @triton.jit
    def gather_dot(v_ptr, bank_ptr, index_ptr, out_ptr, C, E, stride_bank,
                   BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
        """out[b, cols] = bank[index[b, cols]] . v[b], for one row b and a tile of C."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        rows = tl.load(index_ptr + b * C + cols, mask=col_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            ec = e0 + tl.arange(0, BLOCK_E)
            e_ok = ec < E
            v = tl.load(v_ptr + b * E + ec, mask=e_ok, other=0.0)
            picked = tl.load(bank_ptr + rows[:, None] * stride_bank + ec[None, :],
                             mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.sum(picked * v[None, :], axis=1)
        tl.store(out_ptr + b * C + cols, acc, mask=col_ok)

    @triton.autotune(configs=configs, key=["C", "E"])
    @triton.jit
    def gather_weighted_sum(grad_ptr, bank_ptr, index_ptr, out_ptr, C, E, per_split,
                            stride_bank, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
        """out[s, b, ec] = sum over split s's columns c of grad[b, c] bank[index[b, c], ec]."""
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        ec = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = ec < E
        end = tl.minimum((split + 1) * per_split, C)
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for c0 in range(split * per_split, end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < end
            rows = tl.load(index_ptr + b * C + cols, mask=col_ok, other=0).to(tl.int64)
            g = tl.load(grad_ptr + b * C + cols, mask=col_ok, other=0.0)
            picked = tl.load(bank_ptr + rows[:, None] * stride_bank + ec[None, :],
                             mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.sum(picked * g[:, None], axis=0)
        tl.store(out_ptr + (split.to(tl.int64) * tl.num_programs(0) + b) * E + ec, acc,
                 mask=e_ok)

    return SimpleNamespace(gather_dot=gather_dot, gather_weighted_sum=gather_weighted_sum)
