"""Momentum (EMA) update of many parameter copies in one kernel launch.

    targets[i] <- momenta[i] * targets[i] + (1 - momenta[i]) * sources[i]     (in place)

Kernel `_lerp_blocks`, grid (blocks,): every tensor is cut into blocks of BLOCK elements and a
launch plan lists, per block, the target address, the source address, the element count and the
weight 1 - m. One launch updates every pair wherever it lives: neither targets nor sources are
repacked, which matters because the sources are the student's parameters, owned by the engine
(DeepSpeed's ZeRO 1/2 already points them into its own flat buffers: re-pointing them into ours
would silently cut the optimizer off from the model). The plan is built on the host once per
set of (addresses, momenta) and cached, so a training step costs one launch and a tuple
comparison. Pairs the kernel cannot take (gaps in memory, unequal strides, mixed or
unsupported dtypes) take the torch path, `torch._foreach_lerp_`, which is also the reference.
Channels-last pairs (CUDA models) have no gaps: with equal strides they are updated as flat
arrays like contiguous ones.

The arithmetic is torch's lerp with weight w = 1 - m, which is exact at both ends (m = 0 copies,
m = 1 leaves the target untouched): t + w (s - t) when |w| < 0.5, else s - (s - t)(1 - w); in fp32
for 16-bit tensors, rounded once when stored (as torch's opmath does).
"""
import collections
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ._dispatch import interpreting, record, use_triton

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_PLAN_CACHE_SIZE = 8


def momentum_update_ref(targets: Sequence[Tensor], sources: Sequence[Tensor],
                        momenta: Sequence[float]) -> None:
    """The semantics: one `_foreach_lerp_` with a weight 1 - m per pair (ScalarList)."""
    torch._foreach_lerp_(list(targets), list(sources), [1.0 - float(m) for m in momenta])


@torch.no_grad()
def momentum_update_(targets: Sequence[Tensor], sources: Sequence[Tensor],
                     momenta: Sequence[float], impl: str = "auto") -> None:
    """targets[i] <- momenta[i] * targets[i] + (1 - momenta[i]) * sources[i], in place.

    targets[i], sources[i]: same shape, any shapes across i; momenta: one float per pair.
    Targets must not alias sources. impl: "auto" (Triton when every tensor is on CUDA, else
    torch), "triton" (also CPU tensors under TRITON_INTERPRET=1) or "torch".
    """
    if not (len(targets) == len(sources) == len(momenta)):
        raise ValueError(f"momentum_update_: {len(targets)} targets, {len(sources)} sources, "
                         f"{len(momenta)} momenta")
    if not targets:
        return
    if not use_triton(impl, [*targets, *sources], "momentum_update_"):
        record("momentum_update", "torch")
        momentum_update_ref(targets, sources, momenta)
        return
    _triton_update_(list(targets), list(sources), [float(m) for m in momenta])


def _triton_update_(targets: list[Tensor], sources: list[Tensor], momenta: list[float],
                    block: int | None = None) -> None:
    """One launch per (device, dtype) group (one in practice); the rest via the reference."""
    block = block or (256 if interpreting() else 4096)
    # Addresses name the plan: a parameter whose dtype, size or layout changes (`.to()`,
    # `.half()`, channels-last, an engine's flat buffer) is copied to new storage, which
    # cannot take the address of the storage it was copied from. Two passes over the tensors
    # cost ~15 us for ResNet-50's 179 pairs; their dtypes, sizes and strides would add ~60.
    key = (block, tuple(map(Tensor.data_ptr, targets)), tuple(map(Tensor.data_ptr, sources)),
           tuple(momenta))
    plans, rest = _plan(key, targets, sources, momenta, block)
    for plan in plans:
        _kernels().lerp_blocks[(plan.blocks,)](
            plan.table, plan.weights, plan.blocks, BLOCK=block, DTYPE=_tl_dtype(plan.dtype),
            ALIGNED=plan.aligned, num_warps=4 if interpreting() else 8)
    if rest:
        momentum_update_ref(*zip(*rest))
    if not rest:
        record("momentum_update", "triton")
    elif plans:
        record("momentum_update", f"triton, and torch for {len(rest)} of {len(targets)} pairs")
    else:
        record("momentum_update", "torch")


class _Plan:
    __slots__ = ("dtype", "blocks", "table", "weights", "aligned")


_plans: collections.OrderedDict = collections.OrderedDict()


def _plan(key, targets, sources, momenta, block):
    """(plans, rest): a launch plan per (device, dtype) group, and the pairs left to torch."""
    if key in _plans:
        _plans.move_to_end(key)
        return _plans[key]
    groups: dict = {}
    rest = []
    for t, s, m in zip(targets, sources, momenta):
        if (t.dtype == s.dtype and t.dtype in _SUPPORTED and t.device == s.device
                and t.shape == s.shape and t.stride() == s.stride() and _dense(t)):
            if t.numel():
                groups.setdefault((t.device, t.dtype), []).append((t, s, m))
        else:
            rest.append((t, s, m))
    plans = [_build_plan(pairs, block) for pairs in groups.values()]
    _plans[key] = (plans, rest)
    if len(_plans) > _PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plans, rest


def _dense(t: Tensor) -> bool:
    """Whether `t` fills its memory without gaps, in the default or the channels-last order
    (CUDA models are channels-last): a pair with equal shapes and strides is then updated
    element for element as two flat arrays."""
    return t.is_contiguous() or (t.dim() == 4
                                 and t.is_contiguous(memory_format=torch.channels_last))


def _build_plan(pairs: list[tuple[Tensor, Tensor, float]], block: int) -> _Plan:
    t0 = pairs[0][0]
    size = t0.element_size()
    numel = torch.tensor([t.numel() for t, _, _ in pairs], dtype=torch.int64)  # (P,)
    per_tensor = (numel + block - 1) // block  # (P,) blocks of each tensor
    owner = torch.repeat_interleave(torch.arange(len(pairs)), per_tensor)  # (blocks,)
    first = torch.cumsum(per_tensor, 0) - per_tensor  # (P,) index of each tensor's first block
    start = (torch.arange(len(owner)) - first[owner]) * block  # (blocks,) element offsets
    t_addr = torch.tensor([t.data_ptr() for t, _, _ in pairs], dtype=torch.int64)
    s_addr = torch.tensor([s.data_ptr() for _, s, _ in pairs], dtype=torch.int64)
    table = torch.stack([t_addr[owner] + start * size, s_addr[owner] + start * size,
                         torch.clamp(numel[owner] - start, max=block)])  # (3, blocks)
    # The weight is rounded to fp32 once, as torch's foreach lerp rounds its scalar to opmath.
    weights = torch.tensor([1.0 - m for _, _, m in pairs], dtype=torch.float32)[owner]
    plan = _Plan()
    plan.dtype, plan.blocks = t0.dtype, len(owner)
    plan.table = table.to(t0.device).contiguous()
    plan.weights = weights.to(t0.device)
    # 16-byte aligned addresses let the full blocks use 128-bit loads; a view at an odd offset
    # (e.g. inside someone's flat buffer) must not be promised that.
    plan.aligned = bool(((table[:2] % 16) == 0).all())
    return plan


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@functools.cache
def _kernels():
    """Defines the Triton kernel on first use, so importing this module needs no triton.

    Module globals, not closures: the interpreter re-executes a kernel's source against its
    module's globals only.
    """
    global triton, tl, _lerp, lerp_blocks
    import triton
    import triton.language as tl
    from types import SimpleNamespace

    @triton.jit
    def _lerp(t, s, w):
        # torch's lerp: exact at w = 0 (target kept) and w = 1 (source copied).
        return tl.where(tl.abs(w) < 0.5, t + w * (s - t), s - (s - t) * (1.0 - w))

    # No autotune: the kernel updates in place, and timing configs would apply it repeatedly.
    @triton.jit
    def lerp_blocks(table_ptr, weight_ptr, blocks, BLOCK: tl.constexpr, DTYPE: tl.constexpr,
                    ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        t_addr = tl.load(table_ptr + pid)
        s_addr = tl.load(table_ptr + blocks + pid)
        count = tl.load(table_ptr + 2 * blocks + pid)
        w = tl.load(weight_ptr + pid)
        t_ptr = t_addr.to(tl.pointer_type(DTYPE))
        s_ptr = s_addr.to(tl.pointer_type(DTYPE))
        if ALIGNED:  # 16-byte aligned (checked on the host): 128-bit loads and stores
            t_ptr = tl.multiple_of(t_ptr, 16)
            s_ptr = tl.multiple_of(s_ptr, 16)
        offs = tl.arange(0, BLOCK)
        if count == BLOCK:  # full blocks (nearly all bytes): no mask, so loads vectorise
            t = tl.load(t_ptr + offs).to(tl.float32)
            s = tl.load(s_ptr + offs).to(tl.float32)
            tl.store(t_ptr + offs, _lerp(t, s, w).to(DTYPE))
        else:  # each tensor's last block
            ok = offs < count
            t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(t_ptr + offs, _lerp(t, s, w).to(DTYPE), mask=ok)

    return SimpleNamespace(lerp_blocks=lerp_blocks)
