"""The torch engine in one process (gradient accumulation, clipping), what each engine answers
for itself (layout, group of one), what a rank is given (its evaluation shard, its own CRD
negatives) and checkpoints of the single-process layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cocord_fast import distributed
from cocord_fast.checkpoints.files import FORMAT, load_checkpoint
from cocord_fast.config import load_config
from cocord_fast.data import IMAGE_LAYOUT, build_loaders
from cocord_fast.engines import ENGINES, join_processes
from cocord_fast.errors import UserError
from cocord_fast.methods import build_method
from cocord_fast.methods.crd_negatives import NegativeSampler
from cocord_fast.models import build_model
from cocord_fast.training.acceleration import prepare
from cocord_fast.training.metrics import MetricAccumulator
from cocord_fast.training.trainer import Trainer

from distributed_worker import freeze_batchnorm
from launch import train_losses, write_teacher
from markers import BACKENDS


def kd_run(tiny_overrides, tmp_path, name, *extra):
    teacher = write_teacher(tmp_path)
    cfg = load_config(overrides=tiny_overrides + [
        "method.name=kd", "model.teacher=resnet8", f"model.teacher_checkpoint={teacher}",
        "data.backend=torch", f"train.output_dir={tmp_path / name}", *extra])
    trainer = Trainer(cfg)
    freeze_batchnorm(trainer.method)  # no layer that depends on the batch
    trainer.fit()
    return trainer


def test_accumulated_micro_batches_equal_one_batch_of_the_same_samples(tiny_overrides, tmp_path):
    """2 micro-batches of 8 per step and batches of 16 see the same samples in the same
    order (one process), so with BatchNorm frozen they take the same steps."""
    accumulated = kd_run(tiny_overrides, tmp_path, "accum", "data.batch_size=8",
                         "optim.grad_accum_steps=2")
    whole = kd_run(tiny_overrides, tmp_path, "whole", "data.batch_size=16")
    assert accumulated.steps_per_epoch == whole.steps_per_epoch == 7
    a, b = train_losses(tmp_path / "accum"), train_losses(tmp_path / "whole")
    assert a.keys() == b.keys() == set(range(1, 15))
    assert all(a[step] == pytest.approx(b[step], rel=1e-5) for step in a)
    for (name, x), y in zip(accumulated.method.student().state_dict().items(),
                            whole.method.student().state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_clipping_bounds_the_step(tiny_overrides, tmp_path):
    lr, clip = 0.5, 1e-3
    cfg = load_config(overrides=tiny_overrides + [
        f"optim.lr={lr}", "optim.momentum=0", "optim.weight_decay=0", f"optim.grad_clip={clip}",
        "train.max_steps=1", f"train.output_dir={tmp_path / 'clip'}"])
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.method.trainable_module().parameters()]
    trainer.fit()
    after = trainer.method.trainable_module().parameters()
    step_norm = torch.cat([(b - a).flatten() for a, b in zip(before, after)]).norm()
    assert step_norm.item() == pytest.approx(lr * clip, rel=1e-4)


def test_nesterov_without_momentum_is_refused_before_any_data_is_read(tmp_path):
    cfg = load_config(overrides=["optim.nesterov=true", "optim.momentum=0",
                                 f"data.root={tmp_path / 'missing'}", "data.dataset=imagefolder"])
    with pytest.raises(UserError, match=r"^optim.nesterov=true needs optim.momentum above 0$"):
        Trainer(cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_evaluation_sample_is_in_exactly_one_ranks_shard(tiny_overrides, backend):
    cfg = load_config(overrides=tiny_overrides + [f"data.backend={backend}"])
    shards = [torch.cat([batch.index for batch in build_loaders(
        cfg.data, 1, 0, rank=rank, world_size=3).val]).tolist() for rank in range(3)]
    assert [len(s) for s in shards] == [13, 13, 14]  # 40 evaluation images
    assert sorted(sum(shards, [])) == list(range(40))


def test_each_rank_draws_its_own_reproducible_negatives():
    targets = torch.arange(60) % 6
    index = torch.tensor([0, 7, 14, 21])
    draws = {(rank, draw): NegativeSampler(targets, 8, seed=3, rank=rank).sample(index, draw)
             for rank in (0, 1) for draw in (5, 6)}
    assert not torch.equal(draws[0, 5], draws[1, 5])
    assert not torch.equal(draws[0, 5], draws[0, 6])
    assert torch.equal(draws[1, 5], NegativeSampler(targets, 8, seed=3, rank=1).sample(index, 5))


def test_checkpoints_of_the_single_process_layout_still_load(tmp_path):
    optimizer, rng = {"state": {}, "param_groups": []}, {"torch": torch.get_rng_state()}
    torch.save({"format": FORMAT, "step": 3, "method": {}, "optimizer": optimizer, "rng": rng,
                "data_state": b"dali", "skipped_files": 2}, tmp_path / "old.pt")
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint["engine"] == {"name": "torch", "optimizer": optimizer}
    assert checkpoint["world_size"] == 1
    (rank0,) = checkpoint["ranks"]
    assert rank0["skipped_files"] == 2 and "data_state" not in rank0
    assert torch.equal(rank0["rng"]["torch"], rng["torch"])


def test_metric_totals_are_summed_beside_the_means():
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(1.0)})
    acc.add({"loss": torch.tensor(2.0)})
    assert acc.pop(totals={"skipped_files": 3}) == {"loss": 1.5, "skipped_files": 3}


def test_the_layout_and_the_group_of_one_are_each_engines_own_answers(monkeypatch):
    assert ENGINES["torch"].holds_channels_last and not ENGINES["deepspeed"].holds_channels_last
    assert ENGINES["deepspeed"].needs_group_of_one and not ENGINES["torch"].needs_group_of_one

    def conv_layouts(holds_channels_last: bool) -> tuple[bool, bool]:
        """(student's, teacher's) first conv weight channels-last after `prepare`."""
        engine = type("Engine", (), {"holds_channels_last": holds_channels_last})
        method = build_method("kd", load_config(), build_model("resnet8", 10),
                              build_model("resnet8", 10), np.zeros(0))
        prepare(method, torch.device("cpu"), False, engine)
        return tuple(next(p for p in module.parameters() if p.dim() == 4)
                     .is_contiguous(memory_format=IMAGE_LAYOUT)
                     for module in (method.student_encoder, method.teacher_encoder))

    assert conv_layouts(True) == (True, True)
    assert conv_layouts(False) == (False, True)  # the frozen teacher only

    asked = []
    monkeypatch.setattr(distributed, "init",
                        lambda device, timeout_s, group_of_one: asked.append(group_of_one))
    monkeypatch.setitem(ENGINES, "torch", type("Engine", (), {"needs_group_of_one": True}))
    join_processes(load_config(), torch.device("cpu"))
    assert asked == [True]
