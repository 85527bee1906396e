"""The model-only floor of each method: the encoder passes its step makes
(`Method.encoder_passes`) timed alone, with the method's precision, layout and compile setting
(they are the method's own modules, as `Trainer` prepared them), without heads, losses, queue,
banks, optimizer or momentum updates.

The floor is a bound on step time: no step of the method can take less. The bench reports it as
images/s, so a method's `fraction_of_floor` (its images/s over its floor's) is at most 1 and
says how much of a step is the networks: 1.0 means the machinery is free.
"""
from __future__ import annotations

from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..methods import EncoderPasses, Method


def floor_networks(method: Method, passes: EncoderPasses) -> dict[str, nn.Module]:
    """The method's own networks that `passes` runs: 'student', 'slow student', 'teacher'."""
    networks = {"student": method.student()}
    for role, attribute, views in (("slow student", "slow_encoder", passes.slow_student),
                                   ("teacher", "teacher_encoder", passes.teacher)):
        if views:
            if not hasattr(method, attribute):
                raise UserError(f"the floor {passes.name!r} needs a {role}, which "
                                f"{type(method).__name__} does not have")
            networks[role] = getattr(method, attribute)
    return networks


def floor_step(passes: EncoderPasses, networks: dict[str, nn.Module], views: list[Tensor],
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
        logits = [networks["student"](view(i)) for i in range(passes.student)]
        with torch.no_grad():
            # CoCoRD: the slow student sees the student's views in swapped order, and the
            # teacher the last view (x_t); KD's and CRD's teacher sees the student's one view.
            for i in range(passes.slow_student):
                networks["slow student"](view(passes.student - 1 - i))
            for i in range(passes.teacher):
                networks["teacher"](view(len(views) - 1 - i))
    # A scalar of every logit: backward runs through the whole student, as a loss's would.
    torch.stack([out.float().mean() for out in logits]).sum().backward()
    for parameter in networks["student"].parameters():
        parameter.grad = None
