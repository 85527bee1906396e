"""Errors a user can cause: the CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, model name): the message names the field, file or key."""
