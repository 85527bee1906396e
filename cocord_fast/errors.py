"""Errors the CLI reports in one line, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data, checkpoint, model name): the message names the field, file or key.
    The CLI exits with code 2."""


class StageExited(Exception):
    """A stage of the default job, run in a process of its own, ended with `code` after saying
    why itself; the job ends with the same code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
