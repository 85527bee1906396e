"""What torch's weights-only loading may build from a checkpoint or weights file, and what to
say when it refuses one: for checkpoints/ and models/ alike."""
from __future__ import annotations

import argparse
import re

from .errors import UserError


# Classes a weights file may hold besides tensors and plain containers, for
# `torch.serialization.safe_globals`: RepDistiller's final checkpoints (`*_last.pth`) and
# timm's training checkpoints keep their options as an argparse.Namespace. The weights-only
# reader makes one with object.__new__ and fills its __dict__ with what it built itself, so no
# code of the file runs. NumPy values stay refused: NumPy rebuilds them from raw bytes.
SAFE_CLASSES = [argparse.Namespace]


class RefusedFile(UserError):
    """A checkpoint or weights file that `torch.load(weights_only=True)` refused for what it
    holds: unpickling it without that restriction could run code, so it is never loaded."""


_SAVE_WEIGHTS = "cocord_fast reads weights only: save the model's state_dict() with torch.save"
# The Python object torch's weights-only reader refused to build (torch 2.14's wording): a
# class or function the file names, or a kind of tensor it needs an import for (DTensors).
_REFUSED_OBJECT = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"
                             r"|must be imported to load ([^\n]+)")


def refused_by_weights_only_load(err: BaseException, file: str) -> RefusedFile | None:
    """What to tell the user when `torch.load(..., weights_only=True)` raised `err` because
    of what `file` (as the message names it: a path, `field=path`) holds; None for any other
    error. torch's own text goes on to suggest `weights_only=False`, which could run the
    file's code: none of it is passed on."""
    text = str(err)
    if "TorchScript archives" in text:
        return RefusedFile(f"{file} is a TorchScript archive (a model with its code), not "
                           f"weights, and was refused: loading it runs that code; {_SAVE_WEIGHTS}")
    if "legacy .tar format" in text:
        return RefusedFile(f"{file} is in torch's legacy tar format, which torch reads only "
                           f"without its weights-only check, and was refused: that could run "
                           f"code; {_SAVE_WEIGHTS}")
    if "Weights only load failed" not in text:
        return None
    if found := _REFUSED_OBJECT.search(text):
        return RefusedFile(f"{file} holds Python objects other than tensors "
                           f"({found.group(1) or found.group(2)}) and was refused: loading "
                           f"them could run code; {_SAVE_WEIGHTS}")
    # Instructions the reader does not know (pickle protocol 3 and later use some), or
    # objects it cannot build: its reason is the last line of torch's text that is not
    # advice about `weights_only`.
    reasons = [line.strip() for line in text.split("Check the documentation")[0].splitlines()
               if line.strip() and "weights_only" not in line]
    reason = reasons[-1].removeprefix("WeightsUnpickler error:").strip() if reasons else "refused"
    return RefusedFile(f"{file} cannot be checked by torch's weights-only reader ({reason}: "
                       f"pickled with protocol 3 or later, damaged, or holding objects other "
                       f"than tensors) and was refused: loading it unchecked could run code; "
                       f"{_SAVE_WEIGHTS}")
