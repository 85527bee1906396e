"""ReadableSteps: optimizer steps read `depth` steps before they are handed out, and a step that
cannot be read known as soon as it is read, while the steps before it still train."""
import pytest

from cocord_fast.errors import UserError
from cocord_fast.training.readable_steps import ReadableSteps


def batches(unreadable_at: int | None = None, count: int = 9, reads: list | None = None):
    for i in range(count):
        if i == unreadable_at:
            raise UserError(f"cannot decode image {i}.jpg")
        if reads is not None:
            reads.append(i)
        yield i


def test_steps_are_read_depth_ahead_and_a_short_tail_is_dropped():
    reads = []
    steps = ReadableSteps(batches(reads=reads), accumulation=2, depth=2)
    assert reads == [0, 1, 2, 3]  # two steps of two micro-batches, before the first is taken
    assert next(steps) == (0, 1) and reads == [0, 1, 2, 3, 4, 5]
    assert list(steps) == [(2, 3), (4, 5), (6, 7)]  # micro-batch 8 alone is no step
    assert steps.failure is None


def test_an_unreadable_step_is_known_when_read_and_raised_only_when_its_turn_comes():
    steps = ReadableSteps(batches(unreadable_at=5), accumulation=1, depth=2)
    assert [next(steps) for _ in range(3)] == [(0,), (1,), (2,)] and steps.failure is None
    assert next(steps) == (3,)
    assert str(steps.failure) == "cannot decode image 5.jpg"  # read as step 3 was handed out
    assert next(steps) == (4,)  # read before the failure: it still trains
    with pytest.raises(UserError, match="5.jpg"):
        next(steps)
