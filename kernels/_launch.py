"""Launch arithmetic the kernels share: grid sizes and how many programs fill a GPU."""
import functools

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def programs_wanted(device: torch.device) -> int:
    """About two waves of programs on this GPU (two per SM)."""
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
