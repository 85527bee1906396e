"""momentum_update_: the one-launch Triton kernel against `torch._foreach_lerp_`."""
import importlib

import pytest
import torch

from markers import interpreted, on_gpu

from cocord_fast.kernels import implementations_used, momentum_update_, momentum_update_ref

mmod = importlib.import_module("cocord_fast.kernels.momentum_update")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (300,), (1000,), (3, 5, 7), (17, 33)]  # blocks of 256: 1 to 4 per tensor
MOMENTA = [0.9, 0.999, 0.0, 1.0, 0.5, 0.3]


def make_pairs(shapes, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    sources = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return targets, sources


def assert_matches_reference(targets, sources, momenta, impl="triton"):
    expected = [t.clone() for t in targets]
    momentum_update_ref(expected, sources, momenta)
    before = [t.clone() for t in targets]
    sources_before = [s.clone() for s in sources]
    momentum_update_(targets, sources, momenta, impl=impl)
    for t, e, b, s, s0, m in zip(targets, expected, before, sources, sources_before, momenta):
        assert torch.equal(s, s0), "a source changed"
        if m == 0.0:
            assert torch.equal(t, s), "momentum 0 must copy the source exactly"
        elif m == 1.0:
            assert torch.equal(t, b), "momentum 1 must leave the target exactly as it was"
        else:  # same formula in fp32; a fused multiply-add may move the last bit of the inputs'
            # scale (the result itself can be near 0 after cancellation)
            bound = torch.finfo(t.dtype).eps * (b.float().abs() + s.float().abs())
            assert ((t.float() - e.float()).abs() <= bound).all()


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes_and_mixed_momenta(dtype):
    targets, sources = make_pairs(SHAPES, dtype)
    assert_matches_reference(targets, sources, MOMENTA)


@interpreted
def test_non_contiguous_and_unaligned_pairs_still_update():
    """Transposed and strided pairs go to the torch path; an odd-offset view (contiguous but not
    16-byte aligned) stays in the kernel without the alignment promise."""
    targets, sources = make_pairs([(5, 300), (40,), (8, 6), (300,)], torch.float32, seed=1)
    buffer_t, buffer_s = torch.randn(1001), torch.randn(1001)
    targets += [targets[0].T, buffer_t[1:], torch.randn(8, 6)[:, ::2]]
    sources += [sources[0].T.contiguous(), buffer_s[1:], sources[2][:, 1::2]]
    targets = targets[1:]  # targets[0] is now only reachable as its transpose
    sources = sources[1:]
    momenta = [0.99, 0.5, 0.0, 0.7, 0.9, 0.3]
    assert_matches_reference(targets, sources, momenta)
    plans, rest = next(reversed(mmod._plans.values()))
    assert len(rest) == 2 and len(plans) == 1 and not plans[0].aligned


@interpreted
def test_channels_last_pairs_stay_in_the_kernel():
    """Conv weights of a channels-last model (CUDA) are dense; a pair whose layouts differ is
    not elementwise aligned in memory and goes to the torch path."""
    targets, sources = make_pairs([(8, 3, 3, 3), (4, 8, 1, 1), (16, 8, 3, 3)], torch.float32,
                                  seed=4)
    last = torch.channels_last
    targets = [t.contiguous(memory_format=last) for t in targets]
    sources = [s.contiguous(memory_format=last) for s in sources[:2]] + [sources[2]]
    assert_matches_reference(targets, sources, [0.9, 0.99, 0.5])
    plans, rest = next(reversed(mmod._plans.values()))
    assert len(plans) == 1 and plans[0].blocks >= 2 and len(rest) == 1
    assert implementations_used()["momentum_update"] == "triton, and torch for 1 of 3 pairs"


@interpreted
def test_plan_is_reused_and_rebuilt_when_storage_moves():
    targets, sources = make_pairs([(300,), (7,)], torch.float32, seed=2)
    momenta = [0.9, 0.5]
    for _ in range(2):  # the second call hits the cached plan
        assert_matches_reference(targets, sources, momenta)
    targets[0] = targets[0].clone()  # new storage: a new plan, not a stale address
    assert_matches_reference(targets, sources, momenta)


@interpreted
def test_bf16_targets_round_once():
    """A 16-bit EMA is computed in fp32 and rounded once, like torch's opmath lerp."""
    t = torch.full((300,), 1.0, dtype=torch.bfloat16)
    s = torch.full((300,), 1.5, dtype=torch.bfloat16)
    momentum_update_([t], [s], [0.75], impl="triton")
    assert torch.equal(t, torch.full_like(t, 1.125))


# Dispatch: pure torch.

def test_torch_and_auto_on_cpu_are_the_reference():
    for impl in ("torch", "auto"):
        targets, sources = make_pairs(SHAPES, torch.float32)
        expected = [t.clone() for t in targets]
        momentum_update_ref(expected, sources, MOMENTA)
        momentum_update_(targets, sources, MOMENTA, impl=impl)
        assert all(torch.equal(t, e) for t, e in zip(targets, expected))


def test_clear_errors_and_empty_lists():
    targets, sources = make_pairs([(3,)], torch.float32)
    with pytest.raises(ValueError, match="1 targets, 1 sources, 2 momenta"):
        momentum_update_(targets, sources, [0.9, 0.9])
    with pytest.raises(ValueError, match="impl must be one of"):
        momentum_update_(targets, sources, [0.9], impl="fast")
    momentum_update_([], [], [], impl="triton")  # nothing to do, no kernel


# GPU: a ResNet-50-sized parameter set.

@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype):
    shapes = SHAPES + [(2048, 2048), (64, 3, 7, 7), (2048,), (1000, 2048), (4097,)]
    targets, sources = make_pairs(shapes, dtype, device="cuda")
    momenta = (MOMENTA * 2)[:len(shapes)]
    assert_matches_reference(targets, sources, momenta, impl="auto")
    assert implementations_used()["momentum_update"] == "triton"


@on_gpu
def test_gpu_one_launch_without_host_sync():
    """Once the plan is cached, an update is one kernel launch: no copy, no host sync."""
    targets, sources = make_pairs([(2048, 2048), (64,), (3, 3)], torch.float32, device="cuda")
    momentum_update_(targets, sources, [0.99] * 3)  # builds the plan (a host-to-device copy)
    expected = [t.clone() for t in targets]
    momentum_update_ref(expected, sources, [0.99] * 3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.cuda.set_sync_debug_mode("error")  # a host sync raises
        try:
            momentum_update_(targets, sources, [0.99] * 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    launched = [event.name for event in profile.events()
                if event.device_type == torch.autograd.DeviceType.CUDA]
    assert len(launched) == 1 and "lerp_blocks" in launched[0], launched
    assert all(torch.allclose(t, e, rtol=1e-6, atol=1e-7) for t, e in zip(targets, expected))
