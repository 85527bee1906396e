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
    index` (the positive). After the scores are computed, the banks' rows at `index` are
    refreshed in place (no grad): row <- normalize(m * row + (1 - m) * embedding), except
    where `replaced` (the image stands in for an unreadable file, `Batch.replaced`): that row
    is written back unchanged, so no row ever learns another sample's image.

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
                 temperature: float = 0.07, memory_momentum: float = 0.5):
        super().__init__()
        self.num_data, self.temperature = num_data, temperature
        self.memory_momentum = memory_momentum
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
        self.register_load_state_dict_post_hook(CRDLoss._forget_normalizers)

    @staticmethod
    def _forget_normalizers(module: CRDLoss, incompatible_keys) -> None:
        module._normalizers_fixed = None

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, index: Tensor,
                contrast_index: Tensor, replaced: Tensor | None = None) -> Tensor:
        v_s = self.student_embed(student_feature)  # (B, E)
        v_t = self.teacher_embed(teacher_feature)  # (B, E)
        with torch.autocast(v_s.device.type, enabled=False):
            dtype = self.student_memory.dtype
            v_s, v_t = v_s.to(dtype), v_t.to(dtype)
            student_rows = self.teacher_memory[contrast_index]  # (B, K+1, E), detached copies
            teacher_rows = self.student_memory[contrast_index]  # (B, K+1, E)
            student_scores = self._exp_scores(student_rows, v_s)  # (B, K+1)
            teacher_scores = self._exp_scores(teacher_rows, v_t)  # (B, K+1)
            self._fix_normalizers_(student_scores, teacher_scores)
            # The gathered rows are copies, so refreshing the banks now does not touch the graph.
            if replaced is None:
                replaced = torch.zeros_like(index, dtype=torch.bool)
            all_index, all_replaced = distributed.all_gather(
                torch.stack([index, replaced.long()], dim=1)).unbind(1)  # (world * B,) each
            all_v_s, all_v_t = distributed.all_gather(
                torch.cat([v_s, v_t], dim=1).detach()).chunk(2, dim=1)  # (world * B, E) each
            unchanged = all_replaced.bool().unsqueeze(1)  # (world * B, 1)
            self._refresh_(self.student_memory, all_index, all_v_s, unchanged)
            self._refresh_(self.teacher_memory, all_index, all_v_t, unchanged)
            # Z is a constant: divide by copies, since autograd must not save buffers.
            return (nce_loss(student_scores / self.student_normalizer.clone(), self.num_data)
                    + nce_loss(teacher_scores / self.teacher_normalizer.clone(), self.num_data))

    def _exp_scores(self, rows: Tensor, embedding: Tensor) -> Tensor:
        """exp(<row, v> / tau): (B, K+1, E) rows and (B, E) embeddings -> (B, K+1)."""
        return torch.exp(torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2) / self.temperature)

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
    def _refresh_(self, memory: Tensor, index: Tensor, embedding: Tensor,
                  unchanged: Tensor) -> None:
        """`unchanged` (B, 1) bool: rows written back as they are (a mask, not a filter:
        no host sync)."""
        m = self.memory_momentum
        old = memory[index]  # (B, E)
        rows = F.normalize(old * m + embedding * (1 - m), dim=1)
        memory.index_copy_(0, index, torch.where(unchanged, old, rows))
