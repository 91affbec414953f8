"""Damaged inputs, fuzzed from a fixed seed: a complete output or one clear line, nothing else.

Small zarr v2/v3 arrays, OME-Zarr 0.4/0.5 images and TIFF/OME-TIFF files are damaged at random
(truncated or byte-flipped chunks, headers and metadata, missing chunks and metadata keys,
wrong dtype or shape in the metadata, broken multiscales). For each, ``nucflow run`` must exit
0 with a complete output, or exit 2 with one error line naming the input — never exit 1, a
traceback, a hang, or a run.json that says "complete" after a failure. The cases are kept: the
seed is fixed, so every run tries the same ones.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tifffile
import zarr

from nucflow import io, synth
from nucflow.cli import main

SEED = 20261129
FORMATS = ("zarr2", "zarr3", "ome-zarr-0.4", "ome-zarr-0.5", "tiff", "ome-tiff")
N_CASES = 60
METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


# --- the undamaged inputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One small 16x48x48 uint16 stack with four nuclei, in every format."""
    made = synth.make_nuclei((16, 48, 48), n_nuclei=4, diameter=6.0, seed=1)
    image, voxel = made.image, made.voxel_size
    root = tmp_path_factory.mktemp("originals")
    paths = {f: root / name for f, name in zip(FORMATS, (
        "v2.zarr", "v3.zarr", "img04.ome.zarr", "img05.ome.zarr", "img.tif", "img.ome.tif"
    ), strict=True)}  # fmt: skip
    for fmt in ("zarr2", "zarr3"):
        arr = zarr.create_array(
            str(paths[fmt]),
            shape=image.shape,
            chunks=(8, 24, 24),
            dtype=image.dtype,
            zarr_format=2 if fmt == "zarr2" else 3,
        )
        arr[:] = image
    io.write_ome_zarr(paths["ome-zarr-0.4"], image, voxel, chunks=(8, 24, 24))
    group = zarr.open_group(str(paths["ome-zarr-0.5"]), mode="w", zarr_format=3)
    level = group.create_array("0", shape=image.shape, chunks=(8, 24, 24), dtype=image.dtype)
    level[:] = image
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transform = [{"type": "scale", "scale": list(voxel)}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transform}]}
        ],
    }
    tifffile.imwrite(paths["tiff"], image, tile=(16, 16))
    tifffile.imwrite(
        paths["ome-tiff"],
        image,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": voxel[0], "PhysicalSizeX": voxel[2]},
    )
    return paths


# --- the damage --------------------------------------------------------------------------


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    """(metadata files, chunk files) of a zarr store, or ([], [the file]) of a TIFF."""
    if root.is_file():
        return [], [root]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    meta = [p for p in files if p.name in METADATA]
    return meta, [p for p in files if p.name not in METADATA]


def _truncate(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    keep = rng.randrange(0, max(1, len(data)))
    path.write_bytes(data[:keep])
    return f"truncated {path.name} to {keep} of {len(data)} bytes"


def _flip(rng: random.Random, path: Path, *, head: int | None = None) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return f"{path.name} is empty"
    span = min(len(data), head) if head else len(data)
    where = sorted(rng.sample(range(span), min(span, rng.randint(1, 8))))
    for i in where:
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped bits at {where} of {path.name}"


def _json_paths(node, prefix=()) -> list[tuple]:
    """Paths (tuples of keys/indices) of every value inside a JSON document."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_json_paths(value, (*prefix, key)))
    return out


def _edit_json(path: Path, edit: Callable[[dict], str]) -> str:
    doc = json.loads(path.read_text())
    what = edit(doc)
    path.write_text(json.dumps(doc))
    return f"{path.name}: {what}"


def _drop_key(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        keys = [p for p in _json_paths(doc) if isinstance(p[-1], str)]
        victim = rng.choice(keys)
        parent = doc
        for k in victim[:-1]:
            parent = parent[k]
        del parent[victim[-1]]
        return f"removed {'/'.join(map(str, victim))}"

    return _edit_json(path, edit)


_DTYPES_V2 = ["<f8", "|b1", "<c8", "|S4", ">u2", "<i8", "|u1", "<M8[s]", "nonsense", 7]
_DTYPES_V3 = ["float64", "bool", "complex64", "int8", "uint64", "string", "nonsense", 7]


def _wrong_dtype(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        key = "dtype" if "dtype" in doc else "data_type"
        doc[key] = rng.choice(_DTYPES_V2 if key == "dtype" else _DTYPES_V3)
        return f"{key} = {doc[key]!r}"

    return _edit_json(path, edit)


def _wrong_shape(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        shape = list(doc["shape"])
        choice = rng.randrange(5)
        if choice == 0:
            shape = shape[1:]  # one axis fewer
        elif choice == 1:
            shape = [*shape, 2]  # one axis more
        elif choice == 2:
            shape[rng.randrange(len(shape))] *= 2
        elif choice == 3:
            shape[rng.randrange(len(shape))] = 0
        else:
            shape[rng.randrange(len(shape))] = -3
        doc["shape"] = shape
        return f"shape = {shape}"

    return _edit_json(path, edit)


def _break_multiscales(rng: random.Random, path: Path) -> str:
    def edit(doc: dict) -> str:
        attrs = doc.get("attributes", doc)  # zarr v3 keeps attributes inside zarr.json
        ome = attrs.get("ome", attrs)
        ms = ome["multiscales"]
        choice = rng.randrange(8)
        if choice == 0:
            ome["multiscales"] = {}
        elif choice == 1:
            ome["multiscales"] = "0"
        elif choice == 2:
            ms[0]["datasets"] = []
        elif choice == 3:
            ms[0]["datasets"][0] = {"path": "missing"}
        elif choice == 4:
            ms[0]["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "scale": "x"}]
        elif choice == 5:
            ms[0]["axes"] = ms[0]["axes"][:2]
        elif choice == 6:
            ms[0]["axes"] = [{"name": 3, "type": None}] * 3
        else:
            ms[0]["datasets"] = [None]
        return f"multiscales damage {choice}"

    return _edit_json(path, edit)


TIFF_KINDS = ("truncate", "flip", "flip-header")
ZARR_KINDS = ("truncate-chunk", "flip-chunk", "missing-chunk", "truncate-meta", "flip-meta",
              "missing-meta", "drop-key", "dtype", "shape")  # fmt: skip
OME_KINDS = (*ZARR_KINDS, "multiscales", "multiscales")  # broken multiscales twice as often


def _damage(rng: random.Random, root: Path, fmt: str) -> str:
    """Apply one random kind of damage to the copy at ``root``: ``"kind: what was done"``."""
    meta, chunks = _files(root)
    kind = rng.choice(
        TIFF_KINDS if fmt.endswith("tiff") else OME_KINDS if fmt.startswith("ome") else ZARR_KINDS
    )
    return f"{kind}: {_apply(rng, kind, root, meta, chunks)}"


def _apply(rng: random.Random, kind: str, root: Path, meta: list, chunks: list) -> str:
    array_meta = [p for p in meta if p.name == ".zarray" or (
        p.name == "zarr.json" and json.loads(p.read_text()).get("node_type") == "array"
    )]  # fmt: skip
    match kind:
        case "truncate":
            return _truncate(rng, root)
        case "flip" | "flip-header":
            return _flip(rng, root, head=512 if kind == "flip-header" else None)
        case "truncate-chunk":
            return _truncate(rng, rng.choice(chunks))
        case "flip-chunk":
            return _flip(rng, rng.choice(chunks))
        case "missing-chunk" | "missing-meta":
            victim = rng.choice(chunks if kind == "missing-chunk" else meta)
            victim.unlink()
            return f"removed {victim.relative_to(root)}"
        case "truncate-meta":
            return _truncate(rng, rng.choice(meta))
        case "flip-meta":
            return _flip(rng, rng.choice(meta))
        case "drop-key":
            keyed = [p for p in meta if json.loads(p.read_text())]  # an empty .zattrs has none
            return _drop_key(rng, rng.choice(keyed))
        case "dtype":
            return _wrong_dtype(rng, rng.choice(array_meta))
        case "shape":
            return _wrong_shape(rng, rng.choice(array_meta))
    holder = [p for p in meta if p.parent == root and p.name in (".zattrs", "zarr.json")]
    return _break_multiscales(rng, holder[0])


# --- the test ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", range(N_CASES))
def test_damaged_input_gives_a_complete_output_or_one_line(originals, tmp_path, capsys, case):
    rng = random.Random(SEED + case)
    fmt = FORMATS[case % len(FORMATS)]
    source = tmp_path / originals[fmt].name
    if originals[fmt].is_dir():
        shutil.copytree(originals[fmt], source)
    else:
        shutil.copy(originals[fmt], source)
    damage = _damage(rng, source, fmt)
    out = tmp_path / "out"
    argv = ["run", "--input", str(source), "--output", str(out), "--diameter", "6"]
    argv += ["--chunks", "8", "24", "24", "--set", "qc.enabled=false"]

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    context = f"{fmt}, {damage}: exit {code}\n{err[-3000:]}"

    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    assert "Traceback" not in err, context
    if code == 0:
        assert record.get("status") == "complete", context
        assert (out / "nuclei.parquet").exists() and (out / "labels.ome.zarr").exists()
        return
    assert code == 2, context
    ours = [line for line in err.splitlines() if line.startswith("nucflow run:")]
    assert len(ours) == 1, context
    assert ours[0].startswith("nucflow run: error: "), context
    assert str(source) in ours[0], context  # names the input (or a file inside it)
    assert record.get("status") != "complete", context
    assert not (out / "nuclei.parquet").exists(), context


def test_the_cases_cover_every_format_and_kind_of_damage(originals, tmp_path):
    """The fixed seed draws every kind of damage for each family of formats: no idle fuzzing."""
    drawn: dict[str, set[str]] = {"tiff": set(), "zarr": set(), "ome": set()}
    for case in range(N_CASES):
        fmt = FORMATS[case % len(FORMATS)]
        source = tmp_path / str(case) / originals[fmt].name
        source.parent.mkdir()
        copy = shutil.copytree if originals[fmt].is_dir() else shutil.copy
        copy(originals[fmt], source)
        family = "tiff" if fmt.endswith("tiff") else "ome" if fmt.startswith("ome") else "zarr"
        drawn[family].add(_damage(random.Random(SEED + case), source, fmt).split(":")[0])
    assert drawn["tiff"] == set(TIFF_KINDS)
    assert drawn["zarr"] | drawn["ome"] == set(OME_KINDS)
    assert "multiscales" in drawn["ome"]
