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
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nucflow.errors import ConfigError, ParameterError

__all__ = [
    "Params",
    "Preprocess",
    "Threshold",
    "Detect",
    "Mask",
    "Segment",
    "Measure",
    "DERIVED",
    "load",
    "resolve",
    "resource_path",
    "DEFAULT_CHUNKS",
    "default_chunks",
]

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
    "segment.method": (
        lambda v: v in ("builtin", "stardist") or (isinstance(v, str) and v.startswith("python:")),
        "builtin, stardist or python:MODULE:FUNCTION",
    ),
    "segment.input": (_one_of("raw", "preprocessed"), "raw or preprocessed"),
    "segment.normalize": (_optional(_one_of("none", "percentile")), "null, none or percentile"),
    "segment.model": (_optional(lambda v: isinstance(v, str)), "null or a model folder"),
    "segment.device": (_one_of("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "segment.normalize_percentiles": (
        lambda v: _list_of(lambda q: _number(q) and 0 <= q <= 100, (2,))(v) and v[0] < v[1],
        "two increasing numbers in [0, 100], e.g. [1.0, 99.8]",
    ),
    "segment.halo_um": (_optional(_positive), "null or a number > 0"),
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
    # issue 32: sequential ids for viewing (pipeline/relabel.py)
    "output.relabel": (lambda v: v in ("none", "sequential"), "none or sequential"),
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
_FREE_SECTIONS = frozenset({"cluster", "segment.options"})


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


#: The lengths a ``null`` in configs/nuclei.yaml derives from the diameter: (section, key) ->
#: factor (``min_volume`` is the volume of a ball of that many diameters). The YAML's comments
#: say the same ("null = 0.08 x diameter"); tests/test_config.py checks that they agree.
DERIVED: dict[tuple[str, str], float] = {
    ("preprocess", "sigma"): 0.08,
    ("preprocess", "background_radius"): 0.75,
    ("detect", "blob_radius"): 0.3,
    ("mask", "opening_radius"): 0.1,
    ("mask", "min_volume"): 0.4,
    ("segment", "peak_radius"): 0.25,
    ("segment", "min_radius"): 0.15,
    ("segment", "max_radius"): 1.0,
    ("segment", "halo_um"): 1.5,
    ("measure", "shell_width"): 0.15,
    ("measure", "neighbour_distance"): 2.0,
}


@dataclass(frozen=True)
class Preprocess:
    """``preprocess``: the smoothing and background subtraction, lengths resolved."""

    sigma: float
    background: str
    background_radius: float
    background_downsample: tuple[int, ...]
    tissue_mask: str | None


@dataclass(frozen=True)
class Threshold:
    """``threshold``: how the foreground is found (``local`` or one global threshold)."""

    method: str
    value: float | None
    factor: float


@dataclass(frozen=True)
class Detect:
    """``detect``: the local detection's rules (``threshold.method: local``)."""

    blob_radius: float
    snr: float
    fraction: float


@dataclass(frozen=True)
class Mask:
    """``mask``: the opening, hole filling and small-object removal of the foreground."""

    opening_radius: float
    fill_holes: bool
    min_volume: float


@dataclass(frozen=True)
class Segment:
    """``segment``: the seeded partition of the mask into nuclei, or the segmenter a user
    brings (``method: python:MODULE:FUNCTION``, :mod:`nucflow.segmenters`)."""

    peak_radius: float
    min_radius: float
    max_radius: float
    method: str
    options: dict[str, Any]
    input: str
    normalize: str
    normalize_percentiles: tuple[float, ...]
    halo_um: float
    model: str | None
    device: str


@dataclass(frozen=True)
class Measure:
    """``measure``: the table's channels, properties and files."""

    channels: tuple[int, ...]
    single_file_rows: int
    properties: tuple[str, ...]
    percentiles: tuple[float, ...]
    shell_width: float
    neighbour_distance: float
    drop_border: bool


@dataclass(frozen=True)
class Output:
    """``output``: how labels.ome.zarr numbers the nuclei."""

    relabel: str


_G = TypeVar("_G")

# Keys named after their section in the flat view: alone, "method" or "value" say nothing.
_GENERIC = ("method", "value", "factor", "options", "input", "model", "device")


@dataclass(frozen=True)
class Params:
    """The configuration with every derived length filled in (µm, or pixels without voxel
    size): the run's geometry, then one group per section of configs/nuclei.yaml, whose
    defaults it holds alone (:func:`resolve` sets every field)."""

    diameter: float
    voxel_size: tuple[float, ...]
    chunks: tuple[int, ...]
    preprocess: Preprocess
    threshold: Threshold
    detect: Detect
    mask: Mask
    segment: Segment
    measure: Measure
    output: Output
    qc: bool
    filter_steps: tuple[tuple[str, dict[str, Any]], ...]  # the preprocess flow's steps

    @property
    def min_voxels(self) -> int:
        """``mask.min_volume`` in whole voxels: small-object removal keeps larger components
        (and is skipped when this is 0)."""
        return int(self.mask.min_volume / math.prod(self.voxel_size))

    def flat(self) -> dict[str, Any]:
        """Every resolved value by one name (``sigma``, ``threshold_method``, …): the names
        run.json's ``derived`` and the stages' fingerprints (:mod:`nucflow.stages`) use."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not is_dataclass(value):
                values[f.name] = value
                continue
            for g in fields(value):
                name = f"{f.name}_{g.name}" if g.name in _GENERIC else g.name
                values[name] = getattr(value, g.name)
        return values


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
    voxel = _axes("voxel_size", tuple(float(v) for v in (config["voxel_size"] or voxel_size)), ndim)
    chunks = _axes("chunks", tuple(config["chunks"] or default_chunks(tuple(shape))), ndim)
    if config["diameter"] == "auto":  # run, plan and tune replace it by the estimate first
        raise ParameterError("`diameter` auto is estimated by run, plan and tune only; pass µm")
    diameter = float(config["diameter"])
    extent = max(n * v for n, v in zip(shape, voxel, strict=True))
    if diameter > extent:
        raise ParameterError(
            f"`diameter` {diameter:g} is larger than the stack ({extent:g} along its longest "
            "axis); pass the nucleus diameter in µm (or pixels without voxel size)"
        )
    from nucflow.objects import Spec  # checked now, not after the segmentation

    Spec.of(config["measure"]["properties"], ndim=ndim, voxel_size=voxel)

    background_radius = _configured(config, "preprocess", "background_radius", diameter)
    min_volume = config["mask"]["min_volume"]
    if min_volume is None:
        min_volume = _ball_volume(DERIVED["mask", "min_volume"] * diameter, ndim)
    downsample = config["preprocess"]["background_downsample"]
    return Params(
        diameter=diameter,
        voxel_size=voxel,
        chunks=tuple(min(c, n) for c, n in zip(chunks, shape, strict=True)),
        preprocess=_group(
            Preprocess,
            config,
            diameter,
            background_downsample=_downsample(downsample, background_radius, voxel),
        ),
        threshold=_group(Threshold, config, diameter),
        detect=_group(Detect, config, diameter),
        mask=_group(Mask, config, diameter, min_volume=float(min_volume)),
        segment=_group(Segment, config, diameter, normalize=_normalize(config["segment"])),
        measure=_group(Measure, config, diameter),
        output=_group(Output, config, diameter),
        qc=config["qc"]["enabled"],
        filter_steps=tuple(
            (name, dict(p)) for step in config["filter"]["steps"] for name, p in step.items()
        ),
    )


_GROUPS = {Preprocess: "preprocess", Threshold: "threshold", Detect: "detect", Mask: "mask",
           Segment: "segment", Measure: "measure", Output: "output"}  # fmt: skip


def _group(group: type[_G], config: Mapping[str, Any], diameter: float, **given: Any) -> _G:
    """A section's group: each key as configured (``null`` lengths from :data:`DERIVED`),
    converted to its field's type, unless ``given``."""
    section = _GROUPS[group]
    values = {}
    for f in fields(group):  # type: ignore[arg-type]  # a dataclass type
        value = _configured(config, section, f.name, diameter)
        values[f.name] = given[f.name] if f.name in given else _as(str(f.type), value)
    return group(**values)


def _configured(config: Mapping[str, Any], section: str, key: str, diameter: float) -> Any:
    """``section.key`` as configured, a ``null`` length derived from the diameter."""
    value = config[section][key]
    if value is None and (section, key) in DERIVED:
        return float(DERIVED[section, key] * diameter)
    return value


def _as(kind: str, value: Any) -> Any:
    """``value`` as a field annotated ``kind`` holds it (YAML gives ints for floats, lists)."""
    if value is None:
        return None
    if kind == "float":
        return float(value)
    if kind == "tuple[float, ...]":
        return tuple(float(v) for v in value)
    if kind.startswith("tuple["):
        return tuple(value)
    return value


def _normalize(segment: Mapping[str, Any]) -> str:
    """``segment.normalize``: as configured, or by default ``percentile`` for a model
    (trained on normalised images) and ``none`` for the builtin and python functions."""
    if segment["normalize"] is not None:
        return str(segment["normalize"])
    return "percentile" if segment["method"] == "stardist" else "none"


def _axes(key: str, values: tuple, ndim: int) -> tuple:
    """``values``, checked to have one entry per spatial axis."""
    if len(values) != ndim:
        axes = "Z Y X" if ndim == 3 else "Y X"
        raise ParameterError(
            f"`{key}` has {len(values)} values but the stack has {ndim} axes; pass {axes}"
        )
    return values


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
