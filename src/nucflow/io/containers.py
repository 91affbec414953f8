"""Open HDF5 files (h5py) and N5 containers (z5py) once per worker thread, by path.

A task receives a source naming its file, not an open handle (handles do not pickle), and
opening an HDF5 file reads its superblock and B-trees: reopening per task would cost more
than reading a chunk. So each thread keeps the few containers it read last, keyed by path and
version (modification time and size), closed when replaced or when the thread ends.
Opening failures are the user's file: a damaged or truncated file is a ``FormatError``
naming it and the fix; a missing optional library names the extra that installs it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from nucflow.errors import FormatError, InputPathError
from nucflow.io.source import one_line

__all__ = ["container_version", "open_hdf5", "open_n5"]

_KEEP = 4  # containers kept open per thread
_LOCAL = threading.local()


class _Open(OrderedDict[tuple[str, str, tuple[int, int]], Any]):
    """Open containers of one thread; closed when the thread (and its locals) go away."""

    def __del__(self) -> None:
        for handle in self.values():
            _close(handle)


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # closing a file that is already gone: nothing left to release
            pass


def container_version(path: str) -> tuple[int, int]:
    """(modification time in ns, size) of a file, or of an N5 root's attributes.json."""
    target = os.path.join(path, "attributes.json") if os.path.isdir(path) else path
    try:
        st = os.stat(target)
    except OSError as e:
        raise InputPathError(
            f"cannot read {path} ({one_line(e)}); the input must be readable at the same path "
            "on every worker"
        ) from e
    return (st.st_mtime_ns, st.st_size)


def _cached(kind: str, path: str, opener: Any) -> Any:
    key = (kind, path, container_version(path))
    cache = getattr(_LOCAL, "open", None)
    if cache is None:
        cache = _LOCAL.open = _Open()
    handle = cache.pop(key, None)
    if handle is None:
        while len(cache) >= _KEEP:
            _close(cache.popitem(last=False)[1])
        handle = opener(path)
    cache[key] = handle
    return handle


def open_hdf5(path: str, *, what: str = "HDF5 file") -> Any:
    """The h5py File at ``path``, read-only, cached per thread.

    Raises
    ------
    FormatError
        h5py is missing, or the file is not HDF5 or is damaged (e.g. truncated).
    """
    try:
        import h5py
    except ImportError as e:
        raise FormatError(f"reading {path} needs h5py; pip install 'nucflow[hdf5]'") from e

    def opener(name: str) -> Any:
        try:
            return h5py.File(name, "r")
        except OSError as e:
            raise FormatError(
                f"{name} cannot be opened as an {what} ({one_line(e)}); the file is damaged or "
                "truncated: re-copy or re-export it"
            ) from e

    return _cached("hdf5", path, opener)


def open_n5(path: str) -> Any:
    """The z5py N5 File at ``path``, read-only, cached per thread.

    Raises
    ------
    FormatError
        z5py is missing, or ``path`` is not an N5 container.
    """
    try:
        import z5py
    except ImportError as e:
        raise FormatError(f"reading {path} needs z5py; pip install 'nucflow[n5]'") from e

    def opener(name: str) -> Any:
        if not os.path.isfile(os.path.join(name, "attributes.json")):
            raise FormatError(
                f"{name} is not an N5 container (no attributes.json); the BigDataViewer export "
                "is incomplete: re-copy or re-export it"
            )
        try:
            return z5py.File(name, mode="r", use_zarr_format=False)
        except Exception as e:
            raise FormatError(
                f"{name} cannot be opened as N5 ({one_line(e)}); re-copy or re-export it"
            ) from e

    return _cached("n5", path, opener)
