"""nucflow: seam-free nuclei segmentation and measurement for chunked microscopy stacks."""

from __future__ import annotations

from nucflow.errors import NucflowError

__version__ = "0.1.0"
__all__ = ["NucflowError", "__version__"]
