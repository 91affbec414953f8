"""Model packages as segmenters (``segment.method: stardist``): each a function of the
:mod:`nucflow.segmenters` kind, ``f(block, voxel_size, **options) -> labels``.

The package is imported only in the process that calls the function (extra
``nucflow[stardist]``), and the model is loaded once per process, not per block.

StarDist's network sees the block through pooling and its output ``grid``: its values at a
pixel depend on the pixel's position modulo ``grid × 2^unet_n_depth`` from the block's origin.
Blocks and halos that are multiples of it (``--chunks``, ``segment.halo_um``) keep every
padded block's origin on the same phase as the whole image's; otherwise the probabilities,
and rarely an object, differ from the whole-image call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nucflow.errors import ConfigError

__all__ = ["stardist", "stardist_model", "stardist_phase", "stardist_context", "MODEL_FILES"]

#: The files of a StarDist model folder that the fingerprint hashes.
MODEL_FILES = ("config.json", "thresholds.json", "weights_best.h5", "weights_last.h5")

_MODELS: dict[tuple[str, str], Any] = {}


def stardist_model(model: str, device: str = "auto") -> Any:
    """The StarDist2D or StarDist3D model in folder ``model``, loaded once per process.

    Raises
    ------
    ConfigError
        No stardist package, no such model folder, or ``device: cuda`` without a GPU.
    """
    key = (model, device)
    if key in _MODELS:
        return _MODELS[key]
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"`segment.model` {model}: no StarDist model folder there (config.json and "
            "weights_best.h5); pass the folder model.basedir/model.name was saved to"
        )
    if device == "cpu":  # before TensorFlow is imported: it then never opens a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    try:
        import json

        from stardist.models import StarDist2D, StarDist3D
    except ImportError as error:
        raise ConfigError(
            f"`segment.method` stardist needs the stardist package ({error}); "
            "pip install 'nucflow[stardist]'"
        ) from None
    if device == "cuda":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            raise ConfigError(
                "`segment.device` cuda: TensorFlow finds no GPU in this process; use auto or cpu"
            )
    ndim = json.loads((folder / "config.json").read_text()).get("n_dim", 2)
    kind = StarDist3D if ndim == 3 else StarDist2D
    _MODELS[key] = kind(None, name=folder.name, basedir=str(folder.parent))
    return _MODELS[key]


def stardist_phase(model: str) -> int:
    """Voxels per axis a StarDist model's blocks and halos must be multiples of (``grid`` ×
    2^``unet_n_depth``, the largest), read from its config.json (no TensorFlow); 1 if the
    folder has none."""
    import json

    path = Path(model) / "config.json"
    if not path.is_file():
        return 1
    found = json.loads(path.read_text())
    return int(max(found.get("grid", [1]))) * 2 ** int(found.get("unet_n_depth", 0))


def stardist_context(model: str) -> tuple[int, ...] | None:
    """The context in pixels per axis StarDist itself recommends around a tile (its
    receptive field, as ``predict_instances_big`` computes it), or None if unknown: 2D models
    only (StarDist finds it by running the network on an impulse, which took minutes in 3D)."""
    found = stardist_model(model, "auto")
    if found.config.n_dim != 2:
        return None
    try:
        return tuple(int(v) for v in found._axes_tile_overlap("YX"))
    except Exception:  # a private helper of StarDist's: its absence costs only the warning
        return None


def stardist(
    block: np.ndarray,
    voxel_size: Sequence[float],
    *,
    model: str,
    device: str = "auto",
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
) -> np.ndarray:
    """StarDist's instances of one block (already normalised by nucflow: ``segment.normalize:
    percentile`` by default for this method).

    Parameters
    ----------
    block : (M, N[, P]) ndarray
    voxel_size : sequence of float
        Unused: the model was trained at its own sampling.
    model : str
        The model folder (``segment.model``).
    device : {"auto", "cpu", "cuda"}
    prob_thresh, nms_thresh : float, optional
        The model's own thresholds (``thresholds.json``) unless given.
    """
    found = stardist_model(model, device)
    axes = "ZYX" if block.ndim == 3 else "YX"
    labels, _ = found.predict_instances(
        block.astype(np.float32, copy=False),
        axes=axes,
        prob_thresh=prob_thresh,
        nms_thresh=nms_thresh,
        show_tile_progress=False,
        verbose=False,
    )
    return np.asarray(labels)
