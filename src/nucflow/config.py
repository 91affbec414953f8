"""Configuration: defaults from ``configs/nuclei.yaml``, a user file, CLI options, ``--set``.

Every key is checked against the defaults (an unknown key gets the closest known one suggested) and
every value against :data:`SCHEMA`; lengths left ``null`` are derived from the diameter by
:func:`resolve`.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nucflow.errors import ConfigError, ParameterError

__all__ = ["Params", "load", "resolve", "resource_path", "DEFAULT_CHUNKS", "default_chunks"]

DEFAULT_CHUNKS = {2: (1024, 1024), 3: (64, 256, 256)}
#: Above this many default blocks, blocks grow twofold along y and x (once): a pass is one
#: task per block and a distributed scheduler spends ~1 ms per task, so a dense terabyte of
#: 64x256x256 blocks (131,072 blocks, ~1.7 M tasks over all passes) would spend half an hour
#: scheduling; with 64x512x512 it has 32,768 blocks and ~0.43 M tasks, and a task still holds
#: about 1 GiB (segmentation needs ~34 bytes per voxel of a block and its halo).
MAX_DEFAULT_BLOCKS = 20_000


def default_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The block shape when none is configured: :data:`DEFAULT_CHUNKS`, doubled along y and x
    for stacks of more than :data:`MAX_DEFAULT_BLOCKS` such blocks."""
    chunks = DEFAULT_CHUNKS[len(shape)]
    blocks = math.prod(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))
    if blocks > MAX_DEFAULT_BLOCKS:
        chunks = (*chunks[:-2], 2 * chunks[-2], 2 * chunks[-1])
    return chunks


def resource_path(kind: str, name: str) -> Path:
    """Path of a shipped flow or config (``kind`` is "flows" or "configs").

    Installed wheels carry them as ``nucflow/_flows`` and ``nucflow/_configs``; an editable
    checkout reads them from the repository root.
    """
    shipped = resources.files("nucflow") / f"_{kind}" / name
    if shipped.is_file():
        return Path(str(shipped))
    return Path(__file__).resolve().parents[2] / kind / name


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _list_of(check: Callable[[Any], bool], lengths: Iterable[int]) -> Callable[[Any], bool]:
    allowed = set(lengths)
    return lambda v: isinstance(v, list) and len(v) in allowed and all(map(check, v))


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value in choices


# key -> (check, what a valid value looks like)
SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    # `auto`: estimated from the stack before resolve (nucflow.diameter, issue 29)
    "diameter": (lambda v: v == "auto" or _positive(v), "a number > 0 or auto"),
    "voxel_size": (_optional(_list_of(_positive, (2, 3))), "null or 2-3 numbers > 0"),
    "channel": (_optional(_count), "null or an integer >= 0"),
    "chunks": (
        _optional(_list_of(lambda v: _count(v) and v > 0, (2, 3))),
        "null or 2-3 integers > 0",
    ),
    "preprocess.sigma": (_optional(_non_negative), "null or a number >= 0"),
    "preprocess.background": (
        _one_of("tophat", "gaussian", "median", "none"),
        "tophat, gaussian, median or none",
    ),
    "preprocess.background_radius": (_optional(_positive), "null or a number > 0"),
    "preprocess.background_downsample": (
        _optional(
            lambda v: (_count(v) and v > 0) or _list_of(lambda x: _count(x) and x > 0, (2, 3))(v)
        ),
        "null, an integer > 0 or 2-3 integers > 0",
    ),
    "preprocess.tissue_mask": (_optional(lambda v: isinstance(v, str)), "null or a path"),
    "threshold.method": (
        _one_of("local", "otsu", "li", "triangle", "yen", "value"),
        "local, otsu, li, triangle, yen or value",
    ),
    "detect.blob_radius": (_optional(_positive), "null or a number > 0"),
    "detect.snr": (_positive, "a number > 0"),
    "detect.fraction": (lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1"),
    "threshold.value": (
        _optional(_number),
        "null or a finite number",
    ),
    "threshold.factor": (_positive, "a number > 0"),
    "mask.opening_radius": (_optional(_non_negative), "null or a number >= 0"),
    "mask.fill_holes": (lambda v: isinstance(v, bool), "true or false"),
    "mask.min_volume": (_optional(_non_negative), "null or a number >= 0"),
    "segment.peak_radius": (_optional(_positive), "null or a number > 0"),
    "segment.min_radius": (_optional(_positive), "null or a number > 0"),
    "segment.max_radius": (_optional(_positive), "null or a number > 0"),
    "measure.channels": (lambda v: isinstance(v, list) and all(map(_count, v)), "a list of ints"),
    "measure.single_file_rows": (lambda v: _count(v), "an integer >= 0"),
    "measure.properties": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of property names, e.g. [solidity, surface_area]",
    ),
    "measure.percentiles": (
        lambda v: isinstance(v, list) and all(_number(q) and 0 <= q <= 100 for q in v),
        "a list of numbers in [0, 100]",
    ),
    "measure.shell_width": (_optional(_positive), "null or a number > 0"),
    "measure.neighbour_distance": (_optional(_positive), "null or a number > 0"),
    "measure.drop_border": (lambda v: isinstance(v, bool), "true or false"),
    "qc.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "progress.step_percent": (lambda v: _positive(v) and v <= 100, "a number in (0, 100]"),
    "progress.interval_s": (_non_negative, "a number of seconds >= 0"),
    "progress.record_s": (_positive, "a number of seconds > 0"),
    "filter.steps": (
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(s, dict) and len(s) == 1 and isinstance(next(iter(s.values())), dict)
                for s in v
            )
        ),
        "a list of one-key mappings like [{gaussian: {sigma: 1.0}}]",
    ),
}


def load(
    path: str | Path | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the defaults, a recorded run's config, a config file, CLI options and
    ``key=value`` overrides, each over the ones before.

    Parameters
    ----------
    path : path, optional
        A YAML file with any subset of the keys of ``configs/nuclei.yaml``.
    options : mapping, optional
        Dotted key -> value, from CLI options (``None`` values are ignored).
    overrides : iterable of str
        ``"section.key=value"`` strings; values are parsed as YAML.
    recorded : mapping, optional
        The configuration a run recorded (run.json's ``config``): ``--resume`` continues it.

    Returns
    -------
    dict
        The nested, validated configuration.
    """
    config = _read_yaml(resource_path("configs", "nuclei.yaml"))
    if recorded is not None:
        _merge(config, recorded, source="the recorded run.json")
    if path is not None:
        _merge(config, _read_yaml(Path(path)), source=str(path))
    flat = {k: v for k, v in (options or {}).items() if v is not None}
    flat.update(_parse_override(item) for item in overrides)
    for key, value in flat.items():
        _merge(config, _nest(key, value), source="command line")
    for key, (check, expected) in SCHEMA.items():
        value = _get(config, key)
        if not check(value):
            raise ConfigError(f"config `{key}` must be {expected}, got {value!r}")
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set {item!r} must look like key=value, e.g. --set threshold.method=li"
        )
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")[1:]):
        value = {part: value}
    return {dotted.split(".")[0]: value}


def _merge(
    base: dict[str, Any], update: Mapping[str, Any], *, source: str, prefix: str = ""
) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(_unknown_key(dotted, base, prefix, source))
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config `{dotted}` ({source}) must be a mapping of keys")
            if dotted in _FREE_SECTIONS:  # keys checked by their user (nucflow.cluster)
                base[key].update(copy.deepcopy(dict(value)))
            else:
                _merge(base[key], value, source=source, prefix=f"{dotted}.")
        else:
            base[key] = copy.deepcopy(value)


# Sections whose keys belong to another component, which checks them.
_FREE_SECTIONS = frozenset({"cluster"})


def _unknown_key(dotted: str, base: Mapping[str, Any], prefix: str, source: str) -> str:
    known = [f"{prefix}{k}" for k in base]
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown config key `{dotted}` ({source}){hint}"


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Params:
    """The configuration with every derived length filled in (µm, or pixels without voxel size)."""

    diameter: float
    voxel_size: tuple[float, ...]
    chunks: tuple[int, ...]
    sigma: float
    background: str
    background_radius: float
    background_downsample: tuple[int, ...]
    tissue_mask: str | None
    threshold_method: str
    threshold_value: float | None
    threshold_factor: float
    blob_radius: float
    snr: float
    fraction: float
    opening_radius: float
    fill_holes: bool
    min_volume: float
    peak_radius: float
    min_radius: float
    max_radius: float
    channels: tuple[int, ...]
    single_file_rows: int
    qc: bool
    # Defaults live in configs/nuclei.yaml alone: :func:`resolve` sets every field.
    filter_steps: tuple[tuple[str, dict[str, Any]], ...]
    properties: tuple[str, ...]
    percentiles: tuple[float, ...]
    shell_width: float
    neighbour_distance: float
    drop_border: bool

    @property
    def min_voxels(self) -> int:
        """``min_volume`` in whole voxels: small-object removal keeps larger components (and
        is skipped when this is 0)."""
        return int(self.min_volume / math.prod(self.voxel_size))


def resolve(
    config: Mapping[str, Any], *, shape: tuple[int, ...], voxel_size: tuple[float, ...]
) -> Params:
    """Fill every ``null`` length from the diameter and check it against the stack.

    Parameters
    ----------
    config : mapping
        Output of :func:`load`.
    shape : tuple of int
        Spatial shape of the stack.
    voxel_size : tuple of float
        The stack's voxel size (used unless the config sets ``voxel_size``).

    Returns
    -------
    Params
    """
    ndim = len(shape)
    voxel = tuple(float(v) for v in (config["voxel_size"] or voxel_size))
    if len(voxel) != ndim:
        axes = "Z Y X" if ndim == 3 else "Y X"
        raise ParameterError(
            f"`voxel_size` has {len(voxel)} values but the stack has {ndim} axes; pass {axes}"
        )
    chunks = tuple(config["chunks"] or default_chunks(tuple(shape)))
    if len(chunks) != ndim:
        axes = "Z Y X" if ndim == 3 else "Y X"
        raise ParameterError(
            f"`chunks` has {len(chunks)} values but the stack has {ndim} axes; pass {axes}"
        )
    if config["diameter"] == "auto":  # run, plan and tune replace it by the estimate first
        raise ParameterError("`diameter` auto is estimated by run, plan and tune only; pass µm")
    diameter = float(config["diameter"])
    extent = max(n * v for n, v in zip(shape, voxel, strict=True))
    if diameter > extent:
        raise ParameterError(
            f"`diameter` {diameter:g} is larger than the stack ({extent:g} along its longest "
            "axis); pass the nucleus diameter in µm (or pixels without voxel size)"
        )
    pre, seg, msk = config["preprocess"], config["segment"], config["mask"]
    from nucflow.objects import Spec  # checked now, not after the segmentation

    Spec.of(config["measure"]["properties"], ndim=ndim, voxel_size=voxel)

    def derived(value: float | None, factor: float) -> float:
        return float(factor * diameter if value is None else value)

    background_radius = derived(pre["background_radius"], 0.75)
    return Params(
        diameter=diameter,
        voxel_size=voxel,
        chunks=tuple(min(c, n) for c, n in zip(chunks, shape, strict=True)),
        sigma=derived(pre["sigma"], 0.08),
        background=pre["background"],
        background_radius=background_radius,
        background_downsample=_downsample(pre["background_downsample"], background_radius, voxel),
        tissue_mask=pre["tissue_mask"],
        threshold_method=config["threshold"]["method"],
        threshold_value=config["threshold"]["value"],
        threshold_factor=float(config["threshold"]["factor"]),
        blob_radius=derived(config["detect"]["blob_radius"], 0.3),
        snr=float(config["detect"]["snr"]),
        fraction=float(config["detect"]["fraction"]),
        opening_radius=derived(msk["opening_radius"], 0.1),
        fill_holes=msk["fill_holes"],
        min_volume=float(
            _ball_volume(0.4 * diameter, ndim) if msk["min_volume"] is None else msk["min_volume"]
        ),
        peak_radius=derived(seg["peak_radius"], 0.25),
        min_radius=derived(seg["min_radius"], 0.15),
        max_radius=derived(seg["max_radius"], 1.0),
        channels=tuple(config["measure"]["channels"]),
        single_file_rows=config["measure"]["single_file_rows"],
        qc=config["qc"]["enabled"],
        filter_steps=tuple(
            (name, dict(p)) for step in config["filter"]["steps"] for name, p in step.items()
        ),
        properties=tuple(config["measure"]["properties"]),
        percentiles=tuple(float(q) for q in config["measure"]["percentiles"]),
        shell_width=derived(config["measure"]["shell_width"], 0.15),
        neighbour_distance=derived(config["measure"]["neighbour_distance"], 2.0),
        drop_border=config["measure"]["drop_border"],
    )


# The reduced-resolution background keeps at least this many cells across its radius.
_CELLS_PER_RADIUS = 3


def _downsample(given: int | list[int] | None, radius: float, voxel: tuple[float, ...]) -> tuple:
    """Background cell size per axis: as given, or the largest keeping 3 cells per radius."""
    if given is None:
        return tuple(max(1, math.floor(radius / v / _CELLS_PER_RADIUS)) for v in voxel)
    if isinstance(given, int):
        return (given,) * len(voxel)
    if len(given) != len(voxel):
        raise ParameterError(
            f"`preprocess.background_downsample` has {len(given)} values but the stack has "
            f"{len(voxel)} axes; pass one integer or one per axis"
        )
    return tuple(given)


def _ball_volume(diameter: float, ndim: int) -> float:
    """Volume (3D) or area (2D) of a ball of the given diameter."""
    radius = diameter / 2
    return math.pi * radius**2 if ndim == 2 else 4 / 3 * math.pi * radius**3
