"""The single place that decides, per call, whether an op runs its Triton kernels or its torch
reference (config `train.kernels: auto|triton|torch`).

Triton is never imported here: `import cocord_fast` must work on machines without it, and
importing it costs time the CLI does not need when the torch path runs.
"""
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")
# op -> the implementation its latest call ran ("triton" or "torch"), for the run log.
_latest: dict[str, str] = {}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU in its interpreter (TRITON_INTERPRET=1).

    The variable must be set before the first `@triton.jit` decorator executes; our kernels are
    defined on first use, so setting it before the first Triton call of a process is enough.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(impl: str, on_cuda: bool) -> str | None:
    """Why `impl` cannot run (on CUDA tensors, or CPU ones), or None when it can."""
    if impl != "triton":
        return None
    if not triton_available():
        return "impl='triton' needs the triton package (pip install triton)"
    if not on_cuda and not interpreting():
        return ("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                "before triton is first used (Triton's CPU interpreter)")
    return None


def use_triton(impl: str, tensors: list[torch.Tensor], op: str) -> bool:
    """Whether `op` runs its Triton kernels for these inputs.

    auto: Triton when every tensor is on a CUDA device and triton is installed, else torch.
    triton: the kernels, on CUDA tensors or (under TRITON_INTERPRET=1) on CPU tensors; a clear
    error otherwise instead of Triton's "0 active drivers".
    torch: the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        return bool(tensors) and all(t.is_cuda for t in tensors) and triton_available()
    reason = triton_unavailable(impl, all(t.is_cuda for t in tensors))
    if reason is not None:
        raise (ImportError if not triton_available() else RuntimeError)(f"{op}: {reason}")
    return True


def record(op: str, implementation: str) -> None:
    _latest[op] = implementation


def implementations_used(reset: bool = False) -> dict[str, str]:
    """op -> "triton" or "torch": what each fused op's latest call in this process ran (since
    the last reset); `reset` forgets it after reading."""
    used = dict(_latest)
    if reset:
        _latest.clear()
    return used
