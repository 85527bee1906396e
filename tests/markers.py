"""Markers for where a test can run: Triton's interpreter, a CUDA device, NVIDIA DALI, timm."""
import importlib.util
import os

import pytest
import torch

from cocord_fast.data.build import dali_installed

needs_dali = pytest.mark.skipif(not dali_installed(),
                                reason="needs NVIDIA DALI (pip install 'cocord_fast[dali]')")
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="needs timm (pip install 'cocord_fast[timm]')")
# `data.backend` values to parametrize over: DALI's only where it is installed.
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]


def interpreted(test):
    """Triton kernels on CPU tensors, in Triton's interpreter."""
    skip = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                              reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it "
                                     "where there is no CUDA device)")
    return pytest.mark.interpret(skip(test))


def on_gpu(test):
    """Real shapes on a CUDA device (run when a GPU is lent)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason="needs CUDA")(test))
