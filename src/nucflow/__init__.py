"""nucflow: seam-free nuclei segmentation and measurement for chunked microscopy stacks."""

from __future__ import annotations

import os
from typing import Any

from nucflow.errors import NucflowError
from nucflow.version import __version__

__all__ = ["NucflowError", "__version__", "read_table"]


def read_table(output: str | os.PathLike[str], *, lazy: bool = False) -> Any:
    """The nuclei table of a run's output directory; see :func:`nucflow.table.read_table`."""
    from nucflow.table import read_table as read

    return read(output, lazy=lazy)
