"""CoCoRD (Fu, Yang, Yang): contrastive consistent representation distillation, METHOD.md §1."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..config import Config, setting
from ..data import Batch
from ..errors import UserError
from ..kernels import momentum_update_, queue_infonce
from .base import EncoderPasses, Recipe, StepOutput
from .distiller import Distiller
from .heads import build_predictor, build_projector


@dataclass
class CoCoRDSettings:
    """CoCoRD, METHOD.md section 1 (CIFAR-100 defaults)."""

    queue_size: int = setting(2048, "N: teacher keys kept as negatives", min=1)
    temperature: float = setting(0.1, "tau of the contrastive loss", min=1e-6)
    teacher_head_momentum: float = setting(0.999, "m_c: EMA of the student head into the "
                                                  "teacher head", min=0.0, max=1.0)
    student_momentum: float = setting(0.9, "m_r: EMA of the student into the slow student",
                                      min=0.0, max=1.0)
    embed_dim: int = setting(2048, "E: embedding (key, query, queue) dimension", min=1)
    proj_hidden_dim: int = setting(2048, "H: projection-head hidden width", min=1)
    pred_hidden_dim: int = setting(512, "P: predictor hidden width", min=1)
    loss_cls: float = setting(1.0, "lambda_cls: weight of the cross-entropy term", min=0.0)
    loss_ctr: float = setting(1.0, "lambda_ctr: weight of the contrastive term", min=0.0)
    loss_pred: float = setting(4.0, "lambda_pred: weight of the prediction term", min=0.0)
    loss_kd: float = setting(0.0, "lambda_kd: weight of the KD term (CoCoRD+KD: 1.0)", min=0.0)
    kd_temperature: float = setting(4.0, "temperature of the KD term", min=1e-6)


def _cocord_recipe(prefix: str, title: str, loss_kd: float,
                   top1: tuple[float, ...]) -> Recipe:
    pairs = (("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
             ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
             ("wrn_40_2", "ShuffleV1"))
    losses = {"loss_cls": 1.0, "loss_ctr": 1.0, "loss_pred": 4.0, "loss_kd": loss_kd}
    return Recipe(
        prefix, title, title, {"method": {"name": "cocord"}, "cocord": losses},
        dict(zip(pairs, top1)),
        "METHOD.md section 5",
        imagenet_settings={"cocord": {"queue_size": 16384, **losses}},
        imagenet_results={("resnet101", "resnet50"): "CoCoRD's resnet50 0.2 points above its "
                                                     "teacher's top-1 (METHOD.md section 5)"})


RECIPES = (
    _cocord_recipe("cocord", "CoCoRD", 0.0, (75.48, 75.17, 71.74, 72.11, 74.10, 75.29, 73.99,
                                             69.86, 70.22, 74.52, 75.99, 77.28, 76.42)),
    _cocord_recipe("cocord_kd", "CoCoRD+KD", 1.0, (75.90, 75.25, 72.09, 72.18, 74.37, 75.42,
                                                   74.26, 69.90, 70.30, 74.62, 76.48, 77.39,
                                                   76.56)),
)


def _at_least_fp32(x: Tensor) -> Tensor:
    """Losses on bf16 activations (autocast) are computed in fp32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prediction_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """(B,) per-row 2 - 2 cos(prediction, target) (the squared distance of unit vectors)."""
    prediction = F.normalize(_at_least_fp32(prediction), dim=1)  # (B, E)
    target = F.normalize(_at_least_fp32(target), dim=1).to(prediction.dtype)  # (B, E)
    return 2 - 2 * (prediction * target).sum(dim=1)


def contrast_inputs(z: Tensor, keys: Tensor, queue: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, queue snapshot) for `queue_infonce`: the unit queries and keys, and a copy of the
    queue (backward reads it again, after `enqueue_` has written this batch's keys).

    Normalised in at least fp32. Under bf16 autocast (z comes out of a Linear in bf16) the three
    are then rounded to bf16, which the kernel takes on 16-bit tensor cores with products exact
    in fp32 and the logits, logsumexp and loss in fp32: at B=256, E=2048, N=16384 the rounding
    moves the loss by ~2e-5 and dq by ~2e-3 relative (float64 check in tests/test_cocord.py),
    the size of rounding dq to bf16 itself, and the queue read per step halves. Over 30 demo
    steps the loss curve is 0.2-0.5% (four seeds) from that of fp32 contrast inputs, closer
    than fp32 training's (tests/test_acceleration.py).
    """
    q = F.normalize(_at_least_fp32(z), dim=1)  # (B, E)
    k = F.normalize(_at_least_fp32(keys), dim=1)  # (B, E)
    dtype = z.dtype if z.dtype in (torch.bfloat16, torch.float16) else q.dtype
    return q.to(dtype), k.to(dtype), queue.to(dtype, copy=True)


class CoCoRD(Distiller):
    """CoCoRD: contrastive distillation against a queue of teacher keys, plus a prediction
    ("cognate") loss against a slow-moving copy of the student.

    Paper symbols -> attributes: g_s `student_encoder`, f_s `student_projector`, h `predictor`
    (these three are all the optimizer sees: `trainable_module()`); g_s' `slow_encoder` and
    f_s' `slow_projector` (EMA of g_s, f_s with `student_momentum` m_r); g_t `teacher_encoder`
    (frozen, eval mode); f_t `teacher_projector`; Q `queue` (N, E) with `queue_ptr`.

    f_t is a copy of f_s that follows it by EMA with `teacher_head_momentum` m_c when the
    teacher's feature width d_t equals the student's d_s. When d_t != d_s (every cross-
    architecture pair) f_t cannot track f_s: it is randomly initialised and frozen, i.e.
    m_c = 1, and `teacher_head_momentum` then reads 1.0 whatever the config says.

    BatchNorm: the slow copies and f_t follow the method's mode (training mode during
    training: batch statistics, no gradient); the teacher encoder always runs in eval mode.
    Each view is forwarded on its own, so every BatchNorm sees one view's batch statistics,
    as in the reference. Under data parallelism the batch statistics are per rank (no shuffle
    BN): the keys come from a frozen teacher whose backbone uses running statistics, and the
    reference trains on one GPU with the same per-batch statistics in f_t.
    """

    num_views = 3
    name = "cocord"
    settings = CoCoRDSettings
    shape_settings = ("embed_dim", "queue_size", "proj_hidden_dim", "pred_hidden_dim")
    recipes = RECIPES
    label = "CoCoRD"
    # x_s and x'_s through the student and, swapped, through its slow copy; x_t (and x_s
    # for KD, in the same batched forward) through the teacher.
    encoder_passes = EncoderPasses(student=2, slow_student=2, teacher=1)

    def __init__(self, student: nn.Module, teacher: nn.Module, config: CoCoRDSettings,
                 kernels: str = "auto"):
        super().__init__(student, teacher)
        self.config = dataclasses.replace(config)
        self.kernels = kernels  # `train.kernels`: implementation of the two fused ops
        c = self.config
        like = next(student.parameters())  # new heads and the queue take the student's dtype
        self.student_projector = build_projector(student.num_features, c.proj_hidden_dim,
                                                 c.embed_dim).to(like)
        self.predictor = build_predictor(c.embed_dim, c.pred_hidden_dim).to(like)
        self.slow_encoder = copy.deepcopy(student).requires_grad_(False)
        self.slow_projector = copy.deepcopy(self.student_projector).requires_grad_(False)
        self.teacher_tracks_student = teacher.num_features == student.num_features
        if self.teacher_tracks_student:
            self.teacher_projector = copy.deepcopy(self.student_projector)
            self.teacher_head_momentum = c.teacher_head_momentum
        else:
            self.teacher_projector = build_projector(teacher.num_features, c.proj_hidden_dim,
                                                     c.embed_dim).to(like)
            self.teacher_head_momentum = 1.0
        self.teacher_projector.requires_grad_(False)
        self.student_momentum = c.student_momentum
        self._momentum_pairs = None  # listed on first use
        queue = F.normalize(torch.randn(c.queue_size, c.embed_dim, dtype=like.dtype,
                                        device=like.device), dim=1)
        self.register_buffer("queue", queue)  # (N, E): random unit rows until keys replace them
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=like.device))
        # Kept out of `_modules` so the state dict does not list these modules twice.
        self.__dict__["_trainable"] = nn.ModuleDict({
            "student_encoder": self.student_encoder, "student_projector": self.student_projector,
            "predictor": self.predictor})

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> CoCoRD:
        if teacher is None:
            raise UserError("method.name=cocord needs model.teacher and model.teacher_checkpoint")
        return cls(student, teacher, cfg.cocord, cfg.train.kernels)

    @classmethod
    def run_label(cls, cfg: Config) -> str:
        return cls.label + "+KD" * (cfg.cocord.loss_kd > 0)

    def trainable_module(self) -> nn.Module:
        return self._trainable

    def encoders(self) -> list[nn.Module]:
        return [*super().encoders(), self.slow_encoder]

    def train(self, mode: bool = True) -> CoCoRD:
        super().train(mode)
        self._trainable.training = mode  # outside `_modules`, so `train()` does not reach it
        return self

    def forward(self, batch: Batch) -> StepOutput:
        x_s, x_s2, x_t = batch.views  # x_s, x'_s, x_t: each (B, C, H, W)
        c = self.config
        use_kd = c.loss_kd > 0
        # One forward per view: each BatchNorm normalises a view with that view's statistics.
        features = self.student_encoder.forward_features(x_s)  # (B, d_s)
        logits = self.student_encoder.forward_head(features)  # (B, classes)
        z = self.student_projector(features)  # (B, E)
        z2 = self.student_projector(self.student_encoder.forward_features(x_s2))  # (B, E)
        p, p2 = self.predictor(z), self.predictor(z2)  # (B, E) each
        with torch.no_grad():
            # The teacher runs in eval mode, where every sample is normalised on its own, so
            # the KD view can share its forward with x_t.
            teacher_in = torch.cat([x_t, x_s]) if use_kd else x_t
            teacher_features = self.teacher_encoder.forward_features(teacher_in)
            keys = self.teacher_projector(teacher_features[:len(x_t)])  # (B, E), x_t only
            t = self.slow_projector(self.slow_encoder.forward_features(x_s2))  # (B, E)
            t2 = self.slow_projector(self.slow_encoder.forward_features(x_s))  # (B, E)
        # The enqueue below writes the queue in place before backward runs, and backward needs
        # the queue the logits saw: the loss gets a snapshot, which also keeps this batch's
        # keys out of its own negatives.
        q, k, negatives = contrast_inputs(z, keys, self.queue)
        loss_ctr, ctr_top1 = queue_infonce(q, k, negatives, c.temperature, impl=self.kernels)
        # Under bf16 the queue (fp32) then holds bf16 keys: every snapshot rounds to them anyway.
        self.enqueue_(k)
        loss_pred = (prediction_loss(p, t) + prediction_loss(p2, t2)).mean()
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss = c.loss_ctr * loss_ctr + c.loss_cls * loss_cls + c.loss_pred * loss_pred
        out = StepOutput(loss, {"loss_cls": loss_cls.detach(), "loss_ctr": loss_ctr.detach(),
                                "loss_pred": loss_pred.detach(), "ctr_top1": ctr_top1})
        if use_kd:
            out = self.with_kd(out, logits, teacher_features[len(x_t):], c.loss_kd,
                               c.kd_temperature)
        return out

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Writes (B, E) keys (all ranks' under data parallelism) into the FIFO ring at
        `queue_ptr`, wrapping modulo N; B need not divide N.

        The pointer stays on the device: the slots are computed there, so no host sync.
        """
        # Every rank's keys in rank order (each rank's loader gives the same B), so the queues
        # of all ranks stay identical; autocast keys are cast to the queue's dtype.
        keys = distributed.all_gather(keys).to(self.queue.dtype)  # (world * B, E)
        size, count = self.queue.shape[0], keys.shape[0]
        if count > size:  # more keys than slots: only the newest N survive the lap
            keys = keys[count - size:]
        offset = count - keys.shape[0]
        slots = (self.queue_ptr + offset
                 + torch.arange(keys.shape[0], device=self.queue.device)) % size  # (min(B, N),)
        self.queue.index_copy_(0, slots, keys)
        self.queue_ptr.copy_((self.queue_ptr + count) % size)

    def momentum_pairs(self) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """(targets, sources, momenta) of every EMA pair: parameters only, never BN buffers.

        Listed once: walking the modules cost ~0.3 ms a step for ResNet-50 (2026-11-26, 52df6b6). The parameter
        objects stay; engines and layouts that move their storage move it under them."""
        if self._momentum_pairs is None:
            self._momentum_pairs = self._list_momentum_pairs()
        return self._momentum_pairs

    def _list_momentum_pairs(self) -> tuple[list[Tensor], list[Tensor], list[float]]:
        targets = [*self.slow_encoder.parameters(), *self.slow_projector.parameters()]
        sources = [*self.student_encoder.parameters(), *self.student_projector.parameters()]
        momenta = [self.student_momentum] * len(targets)
        if self.teacher_tracks_student:
            head = list(self.teacher_projector.parameters())
            targets += head
            sources += list(self.student_projector.parameters())
            momenta += [self.teacher_head_momentum] * len(head)
        return targets, sources, momenta

    def bank_bytes(self) -> int:
        return self.queue.numel() * self.queue.element_size()

    def effective_settings(self) -> dict[str, tuple[Any, str]]:
        if self.teacher_head_momentum == self.config.teacher_head_momentum:
            return {}
        why = (f"the teacher's features ({self.teacher_encoder.num_features}) and the student's "
               f"({self.student_encoder.num_features}) differ in width: the teacher head is "
               f"random and frozen")
        return {"cocord.teacher_head_momentum": (self.teacher_head_momentum, why)}

    def on_optimizer_step(self) -> None:
        # Right after the optimizer step: the next forward's slow student and teacher head see
        # the student's weights as they are now (METHOD.md, step 3; also correct under
        # gradient accumulation). The first call after init changes nothing: copies == sources.
        momentum_update_(*self.momentum_pairs(), impl=self.kernels)
