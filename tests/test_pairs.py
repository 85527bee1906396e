"""Every published CIFAR-100 pair builds and takes one optimizer step with every method."""
import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.configs.generate import CIFAR_PAIRS
from cocord_fast.data import Batch
from cocord_fast.methods import METHODS, build_method
from cocord_fast.models import build_model

SMALL = ["cocord.embed_dim=32", "cocord.proj_hidden_dim=32", "cocord.pred_hidden_dim=16",
         "cocord.queue_size=24", "crd.embed_dim=16", "crd.num_negatives=8", "kd.loss_kd=0.9"]
NUM_DATA, BATCH = 40, 4


@pytest.mark.parametrize("teacher_name, student_name", list(CIFAR_PAIRS))
@pytest.mark.parametrize("method_name", ["kd", "crd", "cocord"])
def test_pair_takes_one_optimizer_step(method_name, teacher_name, student_name):
    torch.manual_seed(0)
    cfg = load_config(overrides=SMALL)
    student, teacher = build_model(student_name, 100), build_model(teacher_name, 100)
    method = build_method(method_name, cfg, student, teacher, NUM_DATA)
    method.train()
    g = torch.Generator().manual_seed(1)
    index = torch.randperm(NUM_DATA, generator=g)[:BATCH]
    contrast = torch.cat([index[:, None], torch.randint(0, NUM_DATA, (BATCH, 8), generator=g)], 1)
    views = [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(METHODS[method_name].num_views)]
    batch = Batch(views, torch.randint(0, 100, (BATCH,), generator=g), index, contrast)

    params = list(method.trainable_module().parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01)
    out = method(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    method.on_optimizer_step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
