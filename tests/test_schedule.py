import math

import pytest

from cocord_fast.config import OptimConfig
from cocord_fast.training.schedule import lr_factor


def test_step_schedule_decays_at_milestone_epochs():
    cfg = OptimConfig(schedule="step", milestones=[2, 3], gamma=0.1)
    spe = 10  # steps per epoch
    factors = [lr_factor(s, cfg, spe, 50) for s in (0, 19, 20, 29, 30, 49)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_linear_warmup_then_cosine_to_zero():
    cfg = OptimConfig(schedule="cosine", warmup_epochs=0.5)
    spe, total = 10, 40  # 5 warm-up steps
    assert [lr_factor(s, cfg, spe, total) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, cfg, spe, total) == pytest.approx(1.0)
    middle = 5 + 35 / 2
    assert lr_factor(int(middle), cfg, spe, total) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(middle) - 5) / 35)))
    assert lr_factor(total, cfg, spe, total) == pytest.approx(0.0, abs=1e-12)


def test_warmup_applies_to_step_schedule_too():
    cfg = OptimConfig(schedule="step", milestones=[1], warmup_epochs=1)
    assert lr_factor(0, cfg, 4, 8) == pytest.approx(0.25)
    assert lr_factor(4, cfg, 4, 8) == pytest.approx(0.1)
