"""Bring your own segmenter: any Python function, made seam-free by nucflow's rules.

``segment.method: python:MODULE:FUNCTION`` names a function
``FUNCTION(block, voxel_size, **options) -> labels``: ``block`` is the padded block (core +
halo) of the segmentation channel as a numpy array, ``labels`` an integer array of its shape,
0 the background, any positive ids. nucflow calls it once per block and makes its labels those
of the whole stack:

1. **Ids from a canonical voxel.** An object's id is 1 + the global linear index of its first
   voxel in C order (within the padded block, which is the first voxel in the stack when the
   object lies whole in it), as the builtin derives ids from its seeds' positions: every block
   that sees an object whole gives it the same id, so blocks write their cores with no
   communication, and the table's owner rule (the block holding the id's voxel) applies as is.
2. **Every object that meets the core is kept**; the block writes its core.
3. **Cut objects are flagged.** An object that touches the padded block's outer face (not the
   data region's border) may continue beyond what the function saw: it is ``truncated``.

Why this equals the whole-array call: if the function's value at a voxel depends only on the
input within some reach (its support), and every object is smaller than the halo minus that
reach, an object meeting a block's core lies whole in the padded block, away from its faces,
and the function labels it there as it does on the whole array; relabelling by first voxel maps
both to the same id.

Workers import the module by name; one that cannot (a process or Slurm worker started without
the driver's ``sys.path``) adds the folder the driver found it in to its ``sys.path`` first.
The function is imported once per worker process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucflow import adapters
from nucflow.errors import ConfigError, ParameterError

__all__ = ["Segmenter", "relabel", "check_labels", "halo_voxels", "TRUNCATED"]

#: The seed distance (:func:`nucflow.measure.block_stats`) of a cut object's voxels: any
#: value above the table's limit flags the object ``truncated``.
TRUNCATED = np.float32(np.inf)

_CACHE: dict[tuple[str, str], Callable[..., Any]] = {}


@dataclass(frozen=True)
class Segmenter:
    """A ``python:MODULE:FUNCTION`` segmenter, picklable: workers import it by name.

    Attributes
    ----------
    method : str
        The configured ``segment.method``.
    module, function : str
        Where the function lives.
    folder : str
        The folder the driver imported ``module`` from (its top-level package's parent):
        added to a worker's ``sys.path`` when it cannot import the module otherwise.
    source : str
        The file the module was loaded from ("" if none).
    options : dict
        ``segment.options``, passed as keyword arguments.
    """

    method: str
    module: str
    function: str
    folder: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    @classmethod
    def of(
        cls,
        method: str,
        options: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        device: str = "auto",
    ) -> Segmenter:
        """Parse ``segment.method`` and import the function in this process (a model
        package's adapter, :mod:`nucflow.adapters`, imports its package in the workers only).

        Raises
        ------
        ConfigError
            The method is malformed, the module cannot be imported or has no such function,
            or a model method has no ``segment.model``.
        """
        if method == "stardist":
            if not model:
                raise ConfigError(
                    "`segment.method` stardist needs `segment.model`: the folder of a trained "
                    "StarDist model (config.json, weights_best.h5)"
                )
            where = str(Path(model).resolve())
            found = dict(options or {}, model=where, device=device)
            here = Path(adapters.__file__).resolve()
            return cls(method, "nucflow.adapters", "stardist", str(here.parents[1]), "", found,
                       where)  # fmt: skip
        parts = method.split(":")
        if len(parts) != 3 or parts[0] != "python" or not all(parts[1:]):
            raise ConfigError(
                f"`segment.method` {method!r} must look like python:MODULE:FUNCTION, e.g. "
                "python:my_segmenter:segment"
            )
        _, module, function = parts
        found = _import(module, method)
        if not callable(getattr(found, function, None)):
            raise ConfigError(
                f"`segment.method` {method}: module {module} ({found.__file__}) has no "
                f"function {function!r}; name a function defined there"
            )
        source = str(getattr(found, "__file__", "") or "")
        top = module.split(".")[0]
        origin = Path(getattr(sys.modules[top], "__file__", "") or ".").resolve()
        folder = origin.parent.parent if origin.name == "__init__.py" else origin.parent
        return cls(method, module, function, str(folder), source, dict(options or {}))

    def load(self) -> Callable[..., Any]:
        """The function, imported once per process (a worker's first block imports it)."""
        key = (self.module, self.function)
        if key not in _CACHE:
            try:
                found = importlib.import_module(self.module)
            except ImportError:
                if self.folder not in sys.path:
                    sys.path.insert(0, self.folder)
                found = importlib.import_module(self.module)
            _CACHE[key] = getattr(found, self.function)
        return _CACHE[key]

    def __call__(self, block: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
        """Labels of ``block``, checked (:func:`check_labels`)."""
        labels = self.load()(block, tuple(voxel_size), **self.options)
        return check_labels(labels, block.shape, self.method)

    def digest(self) -> str:
        """SHA-256 of the module's source file, or of a model's files: a changed function or
        model is a new segmentation."""
        if self.model:
            digest = hashlib.sha256()
            for name in adapters.MODEL_FILES:
                path = Path(self.model) / name
                if path.is_file():
                    digest.update(name.encode() + path.read_bytes())
            return digest.hexdigest()
        if not self.source or not Path(self.source).is_file():
            return ""
        return hashlib.sha256(Path(self.source).read_bytes()).hexdigest()


def _import(module: str, method: str) -> Any:
    """``module``, from ``sys.path`` or else the current directory (a ``nucflow`` console
    script does not search it by itself)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not module.startswith(error.name):
            raise _import_error(method, module, error) from None  # one of its own imports
        cwd = str(Path.cwd())
        if cwd in sys.path:
            raise _import_error(method, module, error) from None
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module)
        except Exception as again:
            sys.path.remove(cwd)
            raise _import_error(method, module, again) from None
    except Exception as error:  # the module's own code failed: say how, in one line
        raise _import_error(method, module, error) from None


def _import_error(method: str, module: str, error: BaseException) -> ConfigError:
    return ConfigError(
        f"`segment.method` {method}: cannot import module {module} ({type(error).__name__}: "
        f"{error}); put its folder on PYTHONPATH or run nucflow from that folder"
    )


def check_labels(labels: Any, shape: tuple[int, ...], method: str) -> np.ndarray:
    """``labels`` as a numpy array, refused unless integer, of ``shape`` and >= 0.

    Raises
    ------
    ParameterError
        One line naming the method and what it returned.
    """
    found = np.asarray(labels)
    if found.shape != tuple(shape):
        raise ParameterError(
            f"`segment.method` {method} returned labels of shape {found.shape} for a block of "
            f"shape {tuple(shape)}; return an array of the block's shape"
        )
    if found.dtype.kind not in "ui":
        raise ParameterError(
            f"`segment.method` {method} returned {found.dtype} labels; return integer labels "
            "(0 = background, any positive ids)"
        )
    if found.dtype.kind == "i" and found.size and found.min() < 0:
        raise ParameterError(
            f"`segment.method` {method} returned negative labels; return 0 for the background "
            "and positive ids"
        )
    return found


def halo_voxels(halo_um: float, voxel_size: Sequence[float]) -> tuple[int, ...]:
    """``segment.halo_um`` in whole voxels per axis (rounded up)."""
    return tuple(math.ceil(halo_um / v - 1e-9) for v in voxel_size)


def relabel(
    labels: np.ndarray,
    *,
    origin: Sequence[int],
    full_shape: Sequence[int],
    core: tuple[slice, ...],
    outer: Sequence[tuple[bool, bool]],
) -> tuple[np.ndarray, np.ndarray]:
    """The core of a padded block's labels with global ids, and which voxels are cut.

    Parameters
    ----------
    labels : (M, N[, P]) ndarray of int
        The function's labels of the padded block.
    origin : sequence of int
        Stack coordinates of ``labels[0, 0(, 0)]``.
    full_shape : sequence of int
        The stack's shape (ids are 1 + a linear index in it).
    core : tuple of slice
        The block's core within ``labels``.
    outer : sequence of (bool, bool)
        Per axis, whether the low and high faces of the padded block lie inside the data
        region (an object touching such a face is cut).

    Returns
    -------
    ids : ndarray of uint64
        The core's labels: each object's 1 + the global linear index of its first voxel.
    seed_distance : ndarray of float32
        :data:`TRUNCATED` on the voxels of cut objects, 0 elsewhere.
    """
    values, first = np.unique(labels.ravel(), return_index=True)
    coords = np.unravel_index(first, labels.shape)
    at = [c.astype(np.int64) + o for c, o in zip(coords, origin, strict=True)]
    ids = np.ravel_multi_index(at, tuple(full_shape)).astype(np.uint64) + np.uint64(1)
    ids[values == 0] = 0
    inside = labels[core]
    where = np.searchsorted(values, inside)
    new = ids[where]
    faces = [
        np.take(labels, index, axis=axis)
        for axis, (low, high) in enumerate(outer)
        for index, cut in ((0, low), (-1, high))
        if cut
    ]
    cut_values = np.unique(np.concatenate([f.ravel() for f in faces])) if faces else values[:0]
    cut_values = cut_values[cut_values != 0]
    seed_distance = np.zeros(inside.shape, np.float32)
    if len(cut_values):
        seed_distance[np.isin(inside, cut_values)] = TRUNCATED
    return new, seed_distance
