"""One error family for everything a user can get wrong; the CLI turns it into exit code 2."""

from __future__ import annotations

import errno

__all__ = [
    "NucflowError",
    "InputPathError",
    "FormatError",
    "ShapeError",
    "DtypeError",
    "ParameterError",
    "ConfigError",
    "OutputError",
    "InputChangedError",
    "ClusterError",
    "CorruptDataError",
    "BlockError",
    "Terminated",
    "NucflowWarning",
    "environment_message",
]


class NucflowError(ValueError):
    """Bad input or usage: the message names the thing and the fix."""


class NucflowWarning(UserWarning):
    """Something a user should know (nuclei cut by the halo, a lock taken over): the CLI prints
    these as ``nucflow: warning: ...``; other libraries' warnings only with ``--debug``."""


class InputPathError(NucflowError):
    """The input path does not exist or cannot be read."""


class FormatError(NucflowError):
    """The input exists but is not an image nucflow can read."""


class ShapeError(NucflowError):
    """Unsupported or ambiguous dimensionality, or mismatched shapes."""


class DtypeError(NucflowError):
    """The image has a data type nucflow cannot process (string, bool, complex, ...)."""


class ParameterError(NucflowError):
    """A parameter value is out of range or of the wrong kind."""


class ConfigError(NucflowError):
    """A configuration file or ``--set`` override is invalid."""


class OutputError(NucflowError):
    """The output location is unusable (exists, inside the input, ...)."""


class InputChangedError(NucflowError):
    """``--resume`` on an output whose input has changed since (or is another input)."""


class ClusterError(NucflowError):
    """The requested cluster cannot be created or reached."""


class CorruptDataError(NucflowError):
    """A chunk of the input cannot be decoded."""


class BlockError(RuntimeError):
    """A block failed on every attempt for a reason that is not bad input (memory, a bug, ...).

    Not a :class:`NucflowError`: the CLI reports it on one line with exit code 1. Failures
    caused by bad input keep their own class, with the block named in the message.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, or SLURM at the end of the walltime): an interruption like Ctrl-C."""


#: OSErrors that say something about the machine, not a bug: errno -> (what, the fix).
_ENVIRONMENT = {
    errno.EROFS: ("is on a read-only file system", "choose an --output on a writable one"),
    errno.ENOSPC: (
        "is on a full file system",
        "free space or choose an --output with room; --resume then continues the run",
    ),
    errno.EDQUOT: (
        "is over your disk quota",
        "free space or choose an --output with room; --resume then continues the run",
    ),
    errno.EACCES: ("is not accessible to you", "fix its permissions or choose another path"),
    errno.EPERM: ("is not accessible to you", "fix its permissions or choose another path"),
}


def environment_message(error: BaseException, output: object = None) -> str | None:
    """One line for an OSError of the machine (read-only, full, forbidden), else None;
    ``output`` is named when the error names no file (a write inside a library)."""
    if not isinstance(error, OSError) or error.errno not in _ENVIRONMENT:
        return None
    what, fix = _ENVIRONMENT[error.errno]
    where = error.filename or (f"--output {output}" if output else "a file nucflow writes")
    return f"{where} {what} ({error.strerror}); {fix}"
