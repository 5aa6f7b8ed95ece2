"""Errors a user can cause or suffer. The CLI prints each as one line (no traceback) and exits non-zero."""

from __future__ import annotations


class MlrunError(RuntimeError):
    """Base: the message is complete on its own and names what to do."""


class ConfigError(MlrunError):
    pass


class DataError(MlrunError):
    """A dataset is missing, truncated or in the wrong format."""

    def __init__(self, path: object, expected: str, how: str | None = None) -> None:
        msg = f"dataset not usable at {path}: expected {expected}"
        if how:
            msg += f". {how}"
        super().__init__(msg)
        self.path = path


class CheckpointError(MlrunError):
    """A checkpoint could not be read (truncated, corrupted, not ours) or does not fit this model."""
