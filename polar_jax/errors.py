"""User-facing errors.

Everything a user can get wrong (a path, a checkpoint, a prompt, a sparsity setting) raises a subclass of
`PolarError`, so the CLI can print one clear line and exit non-zero instead of a traceback.
"""


class PolarError(ValueError):
    """A problem with the user's input: message names what is wrong and, where possible, how to fix it."""


class CheckpointError(PolarError):
    """A checkpoint folder is missing, incomplete, malformed or does not match its config."""


class UnsupportedModelError(PolarError):
    """The checkpoint's architecture or one of its options is not implemented."""


class InputError(PolarError):
    """Bad prompts, token ids, lengths or generation settings."""
