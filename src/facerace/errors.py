"""The exceptions facerace raises; every message says what to do next."""

from __future__ import annotations


class FaceraceError(Exception):
    """Base class of every error facerace raises on purpose."""


class ImageError(FaceraceError, ValueError):
    """A file or buffer is not a usable image (not an image, truncated, empty, too large)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class InvalidParameterError(FaceraceError, ValueError):
    """An option has a value outside the allowed set or range."""


class ModelNotFoundError(FaceraceError, FileNotFoundError):
    """A model name or directory does not hold a facerace model."""


class ModelIntegrityError(FaceraceError):
    """A model's weights do not match the SHA-256 recorded in its config."""


class DatasetError(FaceraceError):
    """A dataset folder or file does not have the expected layout."""


class WeightsFileError(FaceraceError, ValueError):
    """A weights file is not what the network needs (not HDF5, missing layers, wrong shapes)."""


class CacheError(FaceraceError):
    """The cache folder cannot be used (not writable, locked); the message names it."""


class CheckpointError(FaceraceError):
    """A training checkpoint is not one facerace wrote (it is never unpickled); the message names it."""


class TrainingInterrupted(FaceraceError, KeyboardInterrupt):
    """Ctrl-C during fine-tuning; the message says how to resume."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run that kept what it finished: the message says what was done and where it is;
    `partial` holds the finished part where the run returns one (e.g. `embed`'s Embeddings)."""

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class NoFaceFoundError(FaceraceError):
    """No face could be classified where at least one was needed (e.g. a whole audited collection)."""


class MissingDependencyError(FaceraceError, ImportError):
    """An optional package needed for this operation is not installed."""


class FaceraceWarning(UserWarning):
    """Something the user should know about a result (e.g. a model evaluated on its own training images);
    the CLI prints it as `facerace VERB: warning: ...`."""


class SmallGroupWarning(FaceraceWarning):
    """An audited group has too few faces (or none) for a useful estimate: its intervals are wide."""


class ShiftWarning(FaceraceWarning):
    """An audited collection's faces look unlike the model's held-out faces: the adjusted estimate may be biased."""


class LabelsWarning(FaceraceWarning):
    """A labelled sample given to an audit has rows that cannot be used, or a group has few or no labels."""


def check_choice(name: str, value: str, allowed: list[str] | tuple[str, ...]) -> str:
    """Return `value` if it is in `allowed`, else raise InvalidParameterError with a hint."""
    if value in allowed:
        return value
    import difflib

    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InvalidParameterError(
        f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}.{hint}"
    )
