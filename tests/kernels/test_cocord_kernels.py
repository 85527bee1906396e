"""CoCoRD with `train.kernels=triton` takes the same step as with the torch ops."""
import numpy as np
import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.data import Batch
from cocord_fast.methods import build_method
from cocord_fast.models import build_model

from markers import interpreted


def one_step(kernels: str):
    cfg = load_config(overrides=[f"train.kernels={kernels}", "cocord.queue_size=40",
                                 "cocord.embed_dim=24", "cocord.proj_hidden_dim=32",
                                 "cocord.pred_hidden_dim=16", "cocord.student_momentum=0.5",
                                 "cocord.teacher_head_momentum=0.75"])
    torch.manual_seed(0)
    method = build_method("cocord", cfg, build_model("resnet8", 10), build_model("resnet8", 10),
                          np.zeros(0))
    method.train()
    g = torch.Generator().manual_seed(1)
    batch = Batch([torch.randn(6, 3, 16, 16, generator=g) for _ in range(3)],
                  torch.randint(0, 10, (6,), generator=g))
    optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.5)
    out = method(batch)
    out.loss.backward()
    optimizer.step()
    method.on_optimizer_step()
    return out, method.state_dict()


@interpreted
def test_triton_kernels_reproduce_the_torch_step():
    expected, expected_state = one_step("torch")
    out, state = one_step("triton")
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert out.metrics["ctr_top1"].item() == expected.metrics["ctr_top1"].item()
    for name in ("slow_encoder.conv1.weight", "teacher_projector.0.weight", "queue"):
        assert torch.allclose(state[name], expected_state[name], rtol=1e-5, atol=1e-6), name
    # The updates moved the copies, so the comparison above is not vacuous.
    assert not torch.equal(state["slow_encoder.conv1.weight"], state["student_encoder.conv1.weight"])
