"""train.compile, the channels-last layout, and the run log's record of which
implementation each fused op ran."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.data import Batch
from cocord_fast.methods import build_method, cocord
from cocord_fast.models import build_model
from cocord_fast.training.acceleration import compile_encoders
from cocord_fast.training.metrics import read_log
from cocord_fast.training.trainer import Trainer, train

from launch import write_teacher
from markers import BACKENDS, interpreted, needs_timm, on_gpu


def cocord_overrides(tiny_overrides, tmp_path, *extra):
    teacher = write_teacher(tmp_path)
    return tiny_overrides + [
        "method.name=cocord", "data.backend=torch", "model.teacher=resnet8",
        f"model.teacher_checkpoint={teacher}", "cocord.queue_size=40", "cocord.embed_dim=16",
        "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8", "train.max_steps=4", *extra]


def records(run, kind):
    return [r for r in read_log(run) if r["kind"] == kind]


def assert_same_curve(compiled: list[float], eager: list[float]) -> None:
    """Every logged step: the first step's loss to fp32 rounding; later ones within 1%:
    inductor's fp32 CPU kernels order BatchNorm's backward sums otherwise, which on batches of
    8 moves some gradients by ~4e-3 relative, and the runs drift by that much. What the graphs
    compute is pinned in float64, where it must equal eager to 1e-10 for four whole steps
    (`test_compiled_cocord_takes_the_eager_steps_in_float64`)."""
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=1e-2)


@pytest.mark.parametrize("student, teacher", [
    ("resnet8", "resnet14"),
    # Through the library adapters: timm's trunk, pooling and pre-logits norm in one graph,
    # trained; torchvision's split, frozen. (A trained student with BatchNorm over 4 images of
    # 1x1 or 2x2 maps, as ImageNet models have at 32 or 64 px, is too ill-conditioned for the
    # check: shufflenet_v2_x0_5's gradients differ by 5e-13 in the first step, as summation
    # order allows there, and the runs then part ~1000x a step.)
    pytest.param("timm:convnext_atto", "torchvision:shufflenet_v2_x0_5", marks=needs_timm)])
def test_compiled_cocord_takes_the_eager_steps_in_float64(student, teacher):
    """Four CoCoRD steps (SGD with momentum, momentum updates, enqueues) with every encoder
    compiled as the trainer compiles them, against the same steps eager, in float64: every
    step's loss and terms, and then every parameter and buffer, agree to 1e-10 relative.
    Compiled kernels sum in another order; in float64 that moves a value by ~1e-14, so a
    graph that computes anything else fails."""
    cfg = load_config(overrides=["cocord.queue_size=12", "cocord.embed_dim=8",
                                 "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8"])
    torch.manual_seed(0)
    eager = build_method("cocord", cfg, build_model(student, 10), build_model(teacher, 10),
                         np.zeros(0)).double().train()
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled, True)
    g = torch.Generator().manual_seed(1)
    batches = [Batch([torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
                      for _ in range(3)], torch.randint(0, 10, (4,), generator=g))
               for _ in range(4)]
    steps = {}
    for name, method in (("eager", eager), ("compiled", compiled)):
        optimizer = torch.optim.SGD(method.trainable_module().parameters(), lr=0.1, momentum=0.9)
        steps[name] = []
        for batch in batches:
            out = method(batch)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            method.on_optimizer_step()
            steps[name].append({"loss": out.loss.item(),
                                **{k: v.item() for k, v in out.metrics.items()}})
    for step, (mine, theirs) in enumerate(zip(steps["compiled"], steps["eager"])):
        assert mine == pytest.approx(theirs, rel=1e-10), f"step {step + 1}"
    theirs = eager.state_dict()
    for name, value in compiled.state_dict().items():
        assert torch.allclose(value.double(), theirs[name].double(), rtol=1e-10, atol=1e-12), name
    assert all("forward_features" in vars(encoder) for encoder in compiled.encoders())


def test_compiled_encoders_take_the_eager_steps_without_recompiling(tiny_overrides, tmp_path):
    """Student, teacher and slow student compiled: one graph each, built in the first step;
    the losses follow the eager run's."""
    losses = {}
    for mode in ("false", "true"):
        run = tmp_path / f"compile_{mode}"
        train(load_config(overrides=cocord_overrides(
            tiny_overrides, tmp_path, f"train.compile={mode}", f"train.output_dir={run}")))
        logged = records(run, "train")
        losses[mode] = [r["loss"] for r in logged]
    graphs = [r["compiled_graphs"] for r in logged]
    assert len(graphs) == 4 and graphs == [graphs[0]] * 4 and graphs[0] >= 3
    assert_same_curve(losses["true"], losses["false"])


def test_compile_covers_every_encoder_and_nothing_else(tiny_overrides, tmp_path):
    trainer = Trainer(load_config(overrides=cocord_overrides(
        tiny_overrides, tmp_path, "train.compile=max-autotune")))
    method = trainer.method
    compiled = [name for name, module in method.named_modules()
                if "forward_features" in vars(module)]
    assert compiled == ["student_encoder", "teacher_encoder", "slow_encoder"]
    assert "forward" not in vars(method.student_projector)


def test_compile_mode_is_checked_by_name():
    with pytest.raises(Exception, match="train.compile: 'fast' is not one of false, true, "
                                        "default, reduce-overhead, max-autotune"):
        load_config(overrides=["train.compile=fast"])


def test_bf16_contrast_inputs_follow_the_fp32_contrast_curve(tiny_overrides, tmp_path,
                                                             monkeypatch):
    """30 CoCoRD steps at the default head sizes (E = N = 2048) under bf16 autocast: with q, k
    and the queue rounded to bf16 (as trained) the loss curve stays within 1% on average of
    the same run with fp32 contrast inputs, closer than fp32 training (no autocast) is to it.
    Both gaps grow with the steps as the runs drift apart; measured 0.2-0.5% against 0.7-1.1%
    over seeds 0-3."""
    teacher = write_teacher(tmp_path)
    rounded_contrast_inputs = cocord.contrast_inputs

    def curve(name, precision, contrast_inputs):
        monkeypatch.setattr(cocord, "contrast_inputs", contrast_inputs)
        run = tmp_path / name
        train(load_config(overrides=tiny_overrides + [
            "method.name=cocord", "data.backend=torch", "model.teacher=resnet8",
            f"model.teacher_checkpoint={teacher}", "train.epochs=5", "train.max_steps=30",
            f"train.precision={precision}", f"train.output_dir={run}"]))
        return torch.tensor([r["loss"] for r in records(run, "train")], dtype=torch.float64)

    fp32_contrast = curve("fp32_contrast", "bf16", lambda z, keys, queue: (
        rounded_contrast_inputs(z.float(), keys.float(), queue)))
    rounded = curve("rounded", "bf16", rounded_contrast_inputs)
    fp32 = curve("fp32", "fp32", rounded_contrast_inputs)
    assert len(rounded) == 30

    def gap(losses):
        return ((losses - fp32_contrast).abs() / fp32_contrast).mean().item()

    assert 0 < gap(rounded) < min(0.01, gap(fp32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_and_conv_weights_are_channels_last(tiny_overrides, tmp_path, backend):
    """Batches leave both backends channels-last (the torch path lays them out in the worker,
    so pinning and the device copy keep it), and the networks' conv weights match."""
    trainer = Trainer(load_config(overrides=cocord_overrides(
        tiny_overrides, tmp_path, f"data.backend={backend}")))
    trainer.loaders.train.start(0)
    batch = next(iter(trainer.loaders.train))
    assert len(batch.views) == 3
    for view in batch.views:
        assert view.dim() == 4 and view.is_contiguous(memory_format=torch.channels_last)
        assert not view.is_contiguous()  # (a 3-channel image has both layouts only if 1x1)
    for encoder in trainer.method.encoders():
        assert encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train_step((batch,))  # and a step runs on them


def test_the_run_log_names_the_torch_ops_on_cpu(tiny_overrides, tmp_path):
    run = tmp_path / "auto"
    train(load_config(overrides=cocord_overrides(tiny_overrides, tmp_path, "train.max_steps=2",
                                                 f"train.output_dir={run}")))
    (kernels,) = records(run, "kernels")
    assert kernels["queue_infonce"] == kernels["momentum_update"] == "torch"
    assert kernels["step"] == 1


@interpreted
def test_the_run_log_names_the_triton_kernels(tiny_overrides, tmp_path):
    run = tmp_path / "triton"
    train(load_config(overrides=cocord_overrides(
        tiny_overrides, tmp_path, "train.max_steps=1", "train.kernels=triton",
        "train.device=cpu", f"train.output_dir={run}")))
    (kernels,) = records(run, "kernels")
    assert kernels["queue_infonce"] == kernels["momentum_update"] == "triton"


def test_methods_without_fused_ops_log_none(tiny_overrides, tmp_path):
    run = tmp_path / "vanilla"
    train(load_config(overrides=tiny_overrides + ["train.max_steps=1",
                                                  f"train.output_dir={run}"]))
    assert records(run, "kernels") == [] and records(run, "train")


@on_gpu
@pytest.mark.parametrize("compile_mode", ["false", "default", "reduce-overhead"])
def test_cuda_run_is_channels_last_runs_the_kernels_and_compiles_once(tiny_overrides, tmp_path,
                                                                        compile_mode):
    """On CUDA, train.kernels=auto picks both Triton kernels, conv weights and batches are
    channels-last, and a compiled run builds its graphs in the first step only."""
    run = tmp_path / "cuda"
    cfg = load_config(overrides=cocord_overrides(
        tiny_overrides, tmp_path, "train.device=cuda", "train.precision=bf16",
        f"train.compile={compile_mode}", f"train.output_dir={run}"))
    trainer = Trainer(cfg)
    seen = []
    conv = trainer.method.student_encoder.conv1
    conv.register_forward_pre_hook(lambda module, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.fit()
    (kernels,) = records(run, "kernels")
    assert kernels["queue_infonce"] == kernels["momentum_update"] == "triton"
    if compile_mode == "false":  # hooks do not fire inside a compiled graph
        assert seen and all(seen)
    else:
        graphs = [r["compiled_graphs"] for r in records(run, "train")]
        assert graphs == [graphs[0]] * len(graphs)
