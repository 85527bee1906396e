"""CRD's contrastive objective: embed heads, the two memory banks and the NCE loss.

METHOD.md section 2; facts checked against RepDistiller's `crd/criterion.py` and `crd/memory.py`.
Names against that code: `student_memory` = `memory_v1`, `teacher_memory` = `memory_v2`;
`student_scores` = `out_s` / `out_v1` (student embedding against teacher-bank rows),
`teacher_scores` = `out_t` / `out_v2` (teacher embedding against student-bank rows).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..kernels import bank_scores

EPS = 1e-7  # RepDistiller's `eps` in the NCE loss


class Embed(nn.Module):
    """Linear(d -> E) followed by L2 normalisation."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)  # (B, E)


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """NCE loss of one direction from normalised scores x of shape (B, K+1), positive first.

    -mean_i[ log(x_i0 / (x_i0 + K/n + eps)) + sum_j log((K/n) / (x_ij + K/n + eps)) ]:
    the noise distribution is uniform over the n samples, so K noise draws weigh K/n.
    """
    num_negatives = scores.shape[1] - 1
    noise = num_negatives / num_data
    positive, negatives = scores[:, 0], scores[:, 1:]  # (B,), (B, K)
    log_d1 = torch.log(positive / (positive + noise + EPS))  # (B,)
    log_d0 = torch.log(noise / (negatives + noise + EPS))  # (B, K)
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class CRDLoss(nn.Module):
    """Both directions of CRD's NCE loss, with trainable embed heads and two memory banks.

    `forward(student_feature (B, d_s), teacher_feature (B, d_t), index (B,),
    contrast_index (B, K+1), replaced (B,) bool or None)`, where `contrast_index[:, 0] ==
    index` (the positive). The scores read the banks in place (`kernels.bank_scores`: the
    B x (K+1) x E rows are never gathered), so the banks' rows at `index` are refreshed after
    the backward pass that reads them: `refresh_banks_`, which the method calls after each
    optimizer step, the next forward calls first, and a state dict calls before it is taken
    (no saved bank misses a refresh). The refresh (no grad) is row <- normalize(m * row +
    (1 - m) * embedding), the row as this forward read it, except where `replaced` (the image
    stands in for an unreadable file, `Batch.replaced`): that row is left as it is, so no row
    ever learns another sample's image. One backward per forward, as the engines run them: a
    second forward before the first's backward refreshes the banks that backward reads, and
    autograd refuses it.

    Normalising constants: each direction's Z is fixed on the first batch to
    mean(exp scores) * n_data and kept in a buffer (negative = not fixed yet), so it is saved
    in checkpoints and a resumed run keeps the Z of the original first batch.

    Under several processes the banks and Z stay identical on every rank: the refresh writes
    every rank's rows (indices and embeddings gathered in rank order; shards are disjoint and
    a replaced row keeps its own index, so no row is written twice, and `index_copy_` never
    meets a duplicate, whose winner CUDA leaves undefined), and Z is the mean over the first
    global batch.

    Precision: the banks, scores and loss use the banks' dtype (float32, or float64 after
    `.double()`); under bf16 autocast only the embed heads' matmuls run in bf16, because
    exp(<row, v> / 0.07) amplifies bf16's ~3 significant digits into percent-level errors.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_data: int, embed_dim: int = 128,
                 temperature: float = 0.07, memory_momentum: float = 0.5,
                 kernels: str = "auto"):
        super().__init__()
        self.num_data, self.temperature = num_data, temperature
        self.memory_momentum = memory_momentum
        self.kernels = kernels  # `train.kernels`: the implementation of `bank_scores`
        self.student_embed = Embed(student_dim, embed_dim)
        self.teacher_embed = Embed(teacher_dim, embed_dim)
        bound = 1.0 / math.sqrt(embed_dim / 3)  # RepDistiller's stdv: uniform rows of norm ~1
        for name in ("student_memory", "teacher_memory"):
            self.register_buffer(name, torch.rand(num_data, embed_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("student_normalizer", torch.tensor(-1.0))  # Z of student_scores
        self.register_buffer("teacher_normalizer", torch.tensor(-1.0))  # Z of teacher_scores
        # Whether Z is fixed, read from the buffers once per process (None: not read yet);
        # loading a state dict makes it unknown again.
        self._normalizers_fixed: bool | None = None
        # The latest forward's refresh, until `refresh_banks_` writes it: (index, student
        # rows, teacher rows), or None.
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(CRDLoss._forget_run_state)
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars:
                                          module.refresh_banks_())

    @staticmethod
    def _forget_run_state(module: CRDLoss, incompatible_keys) -> None:
        module._normalizers_fixed, module._pending = None, None

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, index: Tensor,
                contrast_index: Tensor, replaced: Tensor | None = None) -> Tensor:
        self.refresh_banks_()
        v_s = self.student_embed(student_feature)  # (B, E)
        v_t = self.teacher_embed(teacher_feature)  # (B, E)
        with torch.autocast(v_s.device.type, enabled=False):
            dtype = self.student_memory.dtype
            v_s, v_t = v_s.to(dtype), v_t.to(dtype)
            student_scores = self._exp_scores(self.teacher_memory, v_s, contrast_index)
            teacher_scores = self._exp_scores(self.student_memory, v_t, contrast_index)
            self._fix_normalizers_(student_scores, teacher_scores)
            if replaced is None:
                replaced = torch.zeros_like(index, dtype=torch.bool)
            all_index, all_replaced = distributed.all_gather(
                torch.stack([index, replaced.long()], dim=1)).unbind(1)  # (world * B,) each
            all_v_s, all_v_t = distributed.all_gather(
                torch.cat([v_s, v_t], dim=1).detach()).chunk(2, dim=1)  # (world * B, E) each
            self._pending = self._refreshed_rows(all_index, all_v_s, all_v_t,
                                                 all_replaced.bool().unsqueeze(1))
            # Z is a constant: divide by copies, since autograd must not save buffers.
            return (nce_loss(student_scores / self.student_normalizer.clone(), self.num_data)
                    + nce_loss(teacher_scores / self.teacher_normalizer.clone(), self.num_data))

    def _exp_scores(self, bank: Tensor, embedding: Tensor, contrast_index: Tensor) -> Tensor:
        """exp(<bank[contrast_index[b, j]], v_b> / tau): (B, K+1)."""
        return torch.exp(bank_scores(embedding, bank, contrast_index, impl=self.kernels)
                         / self.temperature)

    @torch.no_grad()
    def _fix_normalizers_(self, student_scores: Tensor, teacher_scores: Tensor) -> None:
        """On the first batch (over all ranks), Z = mean(scores) * n_data for each direction."""
        if self._normalizers_fixed is None:
            self._normalizers_fixed = bool(self.student_normalizer >= 0)  # one host read
        if self._normalizers_fixed:
            return
        means = torch.stack([student_scores.mean(), teacher_scores.mean()])  # (2,)
        means = distributed.all_reduce_sum(means) / distributed.world_size()
        self.student_normalizer.copy_(means[0] * self.num_data)
        self.teacher_normalizer.copy_(means[1] * self.num_data)
        self._normalizers_fixed = True

    @torch.no_grad()
    def _refreshed_rows(self, index: Tensor, v_s: Tensor, v_t: Tensor,
                        unchanged: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(index, new student-bank rows, new teacher-bank rows), from the rows as they are
        now; `unchanged` (B, 1) bool: rows kept as they are (a mask, not a filter: no host
        sync)."""
        m = self.memory_momentum
        new_rows = []
        for memory, embedding in ((self.student_memory, v_s), (self.teacher_memory, v_t)):
            old = memory[index]  # (B, E)
            mixed = F.normalize(old * m + embedding * (1 - m), dim=1)
            new_rows.append(torch.where(unchanged, old, mixed))
        return index, new_rows[0], new_rows[1]

    @torch.no_grad()
    def refresh_banks_(self) -> None:
        """Writes the latest forward's refreshed rows into the banks (once; a no-op when
        there is none)."""
        if self._pending is None:
            return
        index, student_rows, teacher_rows = self._pending
        self._pending = None
        self.student_memory.index_copy_(0, index, student_rows)
        self.teacher_memory.index_copy_(0, index, teacher_rows)
