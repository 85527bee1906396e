"""The model-only floor of each method: its networks' forward and backward passes alone, with
the method's precision, layout and compile setting (they are the method's own modules, as
`Trainer` prepared them), without heads, losses, queue, banks, optimizer or momentum updates.

A method's `fraction_of_floor` (its images/s over its floor's) says how much of a step is the
networks: 1.0 means the machinery is free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..methods import Method


@dataclass(frozen=True)
class FloorRecipe:
    """How many views each network sees in one step of the method."""

    student_views: int  # forward and backward
    slow_student_views: int  # forward, no gradient (CoCoRD's momentum copy, training mode)
    teacher_views: int  # forward, no gradient (eval mode)

    @property
    def name(self) -> str:
        parts = [f"student fwd+bwd x{self.student_views}"]
        if self.slow_student_views:
            parts.append(f"slow student fwd x{self.slow_student_views}")
        if self.teacher_views:
            parts.append(f"teacher fwd x{self.teacher_views}")
        return ", ".join(parts)


# What each method's step runs through its networks (METHOD.md); KD and CRD share a floor.
FLOORS = {
    "vanilla": FloorRecipe(student_views=1, slow_student_views=0, teacher_views=0),
    "kd": FloorRecipe(student_views=1, slow_student_views=0, teacher_views=1),
    "crd": FloorRecipe(student_views=1, slow_student_views=0, teacher_views=1),
    "cocord": FloorRecipe(student_views=2, slow_student_views=2, teacher_views=1),
}


def floor_networks(method: Method, recipe: FloorRecipe) -> dict[str, nn.Module]:
    """The method's own networks that `recipe` runs: 'student', 'slow student', 'teacher'."""
    networks = {"student": method.student()}
    for role, attribute, views in (("slow student", "slow_encoder", recipe.slow_student_views),
                                   ("teacher", "teacher_encoder", recipe.teacher_views)):
        if views:
            if not hasattr(method, attribute):
                raise UserError(f"the floor {recipe.name!r} needs a {role}, which "
                                f"{type(method).__name__} does not have")
            networks[role] = getattr(method, attribute)
    return networks


def floor_step(recipe: FloorRecipe, networks: dict[str, nn.Module], views: list[Tensor],
               forward_context: Callable[[], ContextManager]) -> None:
    """One step of the floor on `views`, each network on the views the method gives it
    (CoCoRD: x_s, x'_s, x_t). The student's gradients are dropped after backward, as the optimizer's
    `zero_grad(set_to_none=True)` would."""
    def view(i: int) -> Tensor:
        return views[i % len(views)]

    # Under train.compile=reduce-overhead the networks replay CUDA graphs: a new step may
    # reuse their output buffers, as each training step does (a no-op without graphs).
    torch.compiler.cudagraph_mark_step_begin()
    with forward_context():
        logits = [networks["student"](view(i)) for i in range(recipe.student_views)]
        with torch.no_grad():
            # CoCoRD: the slow student sees the student's views in swapped order, and the
            # teacher the last view (x_t); KD's and CRD's teacher sees the student's one view.
            for i in range(recipe.slow_student_views):
                networks["slow student"](view(recipe.student_views - 1 - i))
            for i in range(recipe.teacher_views):
                networks["teacher"](view(len(views) - 1 - i))
    # A scalar of every logit: backward runs through the whole student, as a loss's would.
    torch.stack([out.float().mean() for out in logits]).sum().backward()
    for parameter in networks["student"].parameters():
        parameter.grad = None
