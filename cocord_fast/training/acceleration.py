"""What makes the method's networks fast on the device they train on: the layout of
`data.IMAGE_LAYOUT` (channels-last), `train.compile`, and on CPU an allocator that keeps what
it frees.

Only the encoders are compiled (`Method.encoders()`: student, teacher, slow student), and of
each only `forward_features`, the convolutional trunk that holds nearly all of a step's
time; the heads, losses, queue and momentum updates stay eager, where the Triton kernels and
the queue's in-place writes need no graph breaks. `forward` calls `forward_features`, so
evaluation and KD's logits run compiled too.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

from ..data import IMAGE_LAYOUT
from ..engines import Engine
from ..methods import Method


def compile_encoders(method: Method, mode: bool | str) -> None:
    """`train.compile`: False leaves the encoders eager; True or a mode name compiles each
    encoder's `forward_features` with `torch.compile(mode=...)`."""
    if mode is False:
        return
    options = {} if mode is True else {"mode": mode}
    for encoder in method.encoders():
        # An instance attribute: the module's state dict and class stay as they are.
        encoder.forward_features = torch.compile(encoder.forward_features, **options)


def mark_step_begin(mode: bool | str) -> None:
    """Before each micro-batch's forward: under `reduce-overhead` the CUDA graphs of the last
    step may then be replayed over (the trunks run several times a step, the slow student
    and the teacher without backward, so CUDA graph trees cannot tell on their own)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (a step that recompiles adds some)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def keep_freed_host_memory() -> None:
    """glibc hands blocks over 128 KiB (a CIFAR batch's activations are ~16 MiB) back to the
    system when freed, so every step faults their pages in again: ~20% of a resnet32x4 ->
    resnet8x4 CoCoRD step on 2 cores (measured 2026-11-26 at 6b76c1d). Raising the thresholds to glibc's largest keeps freed
    blocks below 32 MiB for reuse; the process's memory stays at its peak, as a training
    process's does anyway. No effect with another C library."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        trim_threshold, mmap_threshold = -1, -3  # glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        mallopt(mmap_threshold, 32 << 20)
        mallopt(trim_threshold, 1 << 30)


def prepare(method: Method, device: torch.device, compile_mode: bool | str,
            engine: type[Engine]) -> None:
    """Lays out `method` (already on `device`) and compiles its encoders, before `engine`
    copies the parameters into buffers of its own.

    Where the engine cannot hold channels-last parameters (DeepSpeed), only what nothing
    writes (the teacher: `Method.frozen_modules`) takes that layout; the momentum copies share
    their sources' layout. Every convolution still runs channels-last, as its input is
    (`IMAGE_LAYOUT`): oneDNN and cuDNN take that layout when the input or the weight has it
    (ATen's `_conv_use_channels_last_impl`), converting a default-layout weight per call."""
    if device.type == "cpu":
        keep_freed_host_memory()
    for module in [method] if engine.holds_channels_last else method.frozen_modules():
        module.to(memory_format=IMAGE_LAYOUT)
    compile_encoders(method, compile_mode)
