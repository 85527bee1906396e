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
    contrast_index (B, K+1))`, where `contrast_index[:, 0] == index` (the positive). After the
    scores are computed, the banks' rows at `index` are refreshed in place (no grad):
    row <- normalize(m * row + (1 - m) * embedding).

    Normalising constants: each direction's Z is fixed on the first batch to
    mean(exp scores) * n_data and kept in a buffer (negative = not fixed yet), so it is saved
    in checkpoints and a resumed run keeps the Z of the original first batch.

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

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, index: Tensor,
                contrast_index: Tensor) -> Tensor:
        v_s = self.student_embed(student_feature)  # (B, E)
        v_t = self.teacher_embed(teacher_feature)  # (B, E)
        with torch.autocast(v_s.device.type, enabled=False):
            dtype = self.student_memory.dtype
            v_s, v_t = v_s.to(dtype), v_t.to(dtype)
            student_scores = self._scores(self.teacher_memory, v_s, contrast_index,
                                          self.student_normalizer)  # (B, K+1)
            teacher_scores = self._scores(self.student_memory, v_t, contrast_index,
                                          self.teacher_normalizer)  # (B, K+1)
            # The gathered rows are copies, so refreshing the banks now does not touch the graph.
            self._refresh_(self.student_memory, index, v_s)
            self._refresh_(self.teacher_memory, index, v_t)
            return nce_loss(student_scores, self.num_data) + nce_loss(teacher_scores, self.num_data)

    def _scores(self, memory: Tensor, embedding: Tensor, contrast_index: Tensor,
                normalizer: Tensor) -> Tensor:
        """exp(<row, v> / tau) / Z over the rows `contrast_index`; fixes Z on first use."""
        rows = memory[contrast_index]  # (B, K+1, E), a detached copy: banks take no gradient
        scores = torch.exp(torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2)
                           / self.temperature)  # (B, K+1)
        # torch.where instead of `if normalizer < 0`: no host sync. Z is a constant (detached).
        z = torch.where(normalizer < 0, scores.detach().mean() * self.num_data, normalizer)
        normalizer.copy_(z)
        return scores / z  # divide by the copy: autograd must not save the buffer written above

    @torch.no_grad()
    def _refresh_(self, memory: Tensor, index: Tensor, embedding: Tensor) -> None:
        m = self.memory_momentum
        rows = memory[index] * m + embedding.detach() * (1 - m)  # (B, E)
        memory.index_copy_(0, index, F.normalize(rows, dim=1))
