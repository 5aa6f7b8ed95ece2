"""Errors a user can cause or suffer. The CLI prints each as one line (no traceback) and exits non-zero."""

from __future__ import annotations

import re


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


class RunDirError(MlrunError):
    """The run dir cannot be used: not writable, or it holds another run."""


class NonFiniteLoss(MlrunError):
    """A loss or gradient became NaN/inf; the run stops and the last good checkpoint is kept."""


class Interrupted(MlrunError):
    """SIGINT/SIGTERM (or a stopped sweep): a checkpoint was written and the run can be resumed."""


def describe(e: BaseException) -> str:
    """One line for any error: ours as written; Hydra's instantiation errors by their underlying cause, named
    by the config key that failed; anything else as `Type: first line of the message`."""
    key = getattr(e, "config_key", None)  # set where a config group is built (mlrun.app)
    while type(e).__name__ == "InstantiationException" and e.__cause__ is not None:
        key = _full_key(str(e)) or key
        if str(e).startswith("Error locating target"):  # Hydra's own line says it better than the ImportError
            cause = str(e.__cause__).strip().splitlines()
            return f"{key}: {str(e).split(',')[0]}" + (f" ({cause[-1].strip()})" if cause else "")
        e = e.__cause__
    if type(e).__name__ == "InstantiationException":  # Hydra's own refusal (a blocklisted target, say)
        key = key or _full_key(str(e))
        text = str(e)
    elif isinstance(e, KeyboardInterrupt):
        text = "interrupted (KeyboardInterrupt)"
    elif isinstance(e, MlrunError):
        text = str(e)
    elif isinstance(e, OSError) and e.filename is not None:
        text = f"{e.strerror or type(e).__name__}: {e.filename}"
    elif type(e).__module__.startswith("omegaconf"):  # an interpolation: its message, without OmegaConf's preamble
        text = re.sub(r"^(While dereferencing interpolation '[^']*': |KeyError raised while resolving "
                      r"interpolation: )", "", (str(e).strip().splitlines() or [""])[0]).strip('"')
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(line.strip() for line in text.strip().splitlines()[:1]) or type(e).__name__
    return f"{key}: {text}" if key and not text.startswith(f"{key}:") else text


def _full_key(message: str) -> str | None:
    for line in message.splitlines():
        if line.strip().startswith("full_key:"):
            return line.split(":", 1)[1].strip() or None
    return None
