"""Accuracy of nucflow's detection against the ground truth, over seeds, conditions and geometries.

Run ``python benchmarks/accuracy.py`` (3 seeds, ~7 min on the shared 2-core machine) or add
``--quick`` (seed 0 only). For every seed, condition and geometry the script

1. draws a synthetic stack with ``nucflow.synth.make_nuclei`` (nuclei ~8 µm) and writes it as
   OME-Zarr in a temporary directory;
2. runs ``nucflow run --diameter 8`` on it, nothing else given (the voxel size comes from the
   OME-Zarr; ``--set qc.enabled=false`` skips the pictures, which do not change the labels),
   once with the default local detection and once with ``--set threshold.method=otsu``;
3. runs the whole-array scikit-image reference of ``benchmarks/pipeline.py`` (its
   ``reference_mask`` and ``reference_labels``) with the derived parameters of the default
   run's run.json;
4. scores all three label images with ``nucflow.evaluate.accuracy_report``;
5. with ``--sweep``, also runs the default pipeline with ``--diameter`` at each factor of
   :data:`SWEEP` times 8 µm (a user's wrong guess) and adds a table of F1 per factor.

``nucflow run`` is called in this process (``nucflow.cli.main``, the console script's entry
point) to spare 90 interpreter starts; its output goes to a log file next to the stack.

Conditions (``nucflow.synth.Conditions``):

- ``uniform``: the even, bright stacks of the demo (``synth.UNIFORM``);
- ``dim``: log-normal brightness with a wide spread and a sixth of the photons;
- ``attenuated``: 3x less signal at the bottom of the stack than at the top;
- ``crowded``: 2.5x the nuclei, 80 % of them placed touching another;
- ``lightsheet``: ``synth.LIGHTSHEET`` (brightness spread, 3x attenuation, uneven illumination,
  irregular outlines, anisotropic PSF, a third of the photons), half the nuclei clustered.

The table gives, per geometry, condition and pipeline, the mean over seeds and in brackets the
worst seed (the minimum; for splits and merges the maximum). Its output on the 2-core
development machine is in ``benchmarks/README.md`` and ``benchmarks/results/accuracy.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import DIAMETER, read_level0, reference_labels, reference_mask  # noqa: E402

from nucflow import io, synth  # noqa: E402
from nucflow.cli import main as nucflow_main  # noqa: E402
from nucflow.evaluate import accuracy_report  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "accuracy.md"
SEEDS = (0, 1, 2)
# diameter factors of the sweep: a user's guess 0.75x-1.33x the true typical diameter
SWEEP = (0.75, 0.87, 1.0, 1.15, 1.33)
# the demo's density: 150 nuclei in 64x256x256 voxels of (1, 0.5, 0.5) µm
DENSITY_3D = 150 / (64 * 128 * 128)  # per µm³
# 160 nuclei in 384x384 pixels of 0.5 µm, a fifth of the area covered (a dense tissue section)
DENSITY_2D = 160 / (192 * 192)  # per µm²


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    voxel: tuple[float, ...]

    @property
    def nuclei(self) -> int:
        """Nuclei at the demo's density."""
        extent = math.prod(n * v for n, v in zip(self.shape, self.voxel, strict=True))
        return round(extent * (DENSITY_3D if len(self.shape) == 3 else DENSITY_2D))


@dataclass(frozen=True)
class Condition:
    conditions: synth.Conditions
    crowding: float = 1.0  # nuclei relative to the demo's density
    cluster_fraction: float = 0.4  # make_nuclei's default


GEOMETRIES = {
    "3D anisotropic": Geometry((48, 192, 192), (2.0, 0.5, 0.5)),
    "3D isotropic-ish": Geometry((48, 192, 192), (1.0, 0.5, 0.5)),
    "2D": Geometry((384, 384), (0.5, 0.5)),
}
CONDITIONS = {
    "uniform": Condition(synth.UNIFORM),
    "dim": Condition(synth.Conditions(brightness_spread=0.6, photons=150.0)),
    "attenuated": Condition(synth.Conditions(attenuation=3.0)),
    "crowded": Condition(synth.UNIFORM, crowding=2.5, cluster_fraction=0.8),
    "lightsheet": Condition(synth.LIGHTSHEET, cluster_fraction=0.5),
}
# table name -> (short name: output folder, progress line; extra `nucflow run` arguments)
PIPELINES = {
    "nucflow local (default)": ("local", []),
    "nucflow otsu": ("otsu", ["--set", "threshold.method=otsu"]),
}
PIPELINE_DEFAULT = "nucflow local (default)"
REFERENCE = "scikit-image reference"
# accuracy_report key (index into its list, if any), column title, worse is lower?
METRICS = (
    ("f1_iou50", None, "F1@0.5", True),
    ("f1_iou70", None, "F1@0.7", True),
    ("splits", None, "splits", False),
    ("merges", None, "merges", False),
    ("recall_by_brightness", 0, "recall dimmest third", True),
    ("recall_by_depth", 2, "recall deepest third", True),
)


# ----------------------------------------------------------------------------- one stack


def draw(folder: Path, geometry: Geometry, condition: Condition, seed: int) -> synth.SyntheticStack:
    """Draw one stack and write it (with its truth) as OME-Zarr at ``folder/input.ome.zarr``."""
    made = synth.make_nuclei(
        geometry.shape,
        n_nuclei=round(geometry.nuclei * condition.crowding),
        diameter=DIAMETER,
        voxel_size=geometry.voxel,
        cluster_fraction=condition.cluster_fraction,
        seed=seed,
        conditions=condition.conditions,
    )
    io.write_ome_zarr(
        folder / "input.ome.zarr", made.image, made.voxel_size, labels={"truth": made.truth}
    )
    return made


def run_nucflow(folder: Path, name: str, extra: list[str], diameter: float = DIAMETER) -> Path:
    """``nucflow run --diameter 8`` (or ``diameter``; plus ``extra``) into ``folder/name``;
    returns that."""
    output = folder / name
    argv = ["run", "--input", str(folder / "input.ome.zarr"), "--output", str(output)]
    argv += ["--diameter", f"{diameter:g}", "--set", "qc.enabled=false", *extra]
    log = folder / f"{output.name}.log"
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = nucflow_main(argv)
    if code != 0:
        sys.exit(f"nucflow {' '.join(argv)} failed ({code}):\n{log.read_text()[-3000:]}")
    return output


def run_reference(image: np.ndarray, run_json: Path) -> np.ndarray:
    """benchmarks/pipeline.py's whole-array pipeline with the run's derived parameters."""
    record = json.loads(run_json.read_text())
    voxel, derived = tuple(record["voxel_size_um"]), record["derived"]
    mask, _ = reference_mask(image, voxel, derived, {})
    return reference_labels(mask, voxel, derived, {})


def sweep_name(factor: float) -> str:
    """Table name of the default pipeline run with ``--diameter factor * 8``."""
    return f"nucflow local, --diameter x{factor:g}"


def score_stack(
    folder: Path, geometry: Geometry, condition: Condition, seed: int, sweep: tuple = ()
) -> dict:
    """Pipeline name -> accuracy report on one freshly drawn stack (``sweep``: diameter factors
    the default pipeline is also run with, 1 excepted: that is the default run)."""
    made = draw(folder, geometry, condition, seed)
    labels = {}
    for name, (short, extra) in PIPELINES.items():
        labels[name] = read_level0(run_nucflow(folder, short, extra) / "labels.ome.zarr")
    for factor in (f for f in sweep if f != 1):
        out = run_nucflow(folder, f"local-x{factor:g}", [], diameter=factor * DIAMETER)
        labels[sweep_name(factor)] = read_level0(out / "labels.ome.zarr")
    # the derived parameters do not depend on the threshold method: take the default run's
    labels[REFERENCE] = run_reference(made.image, folder / "local" / "run.json")
    reports = {n: accuracy_report(lab, made.truth, made.brightness) for n, lab in labels.items()}
    covered = float(np.mean(made.truth > 0))
    for report in reports.values():
        report.update(seed=seed, covered=covered)
    return reports


# ----------------------------------------------------------------------------- table


def _value(report: dict, key: str, index: int | None) -> float:
    value = report[key] if index is None else report[key][index]
    return math.nan if value is None else float(value)


def _cell(values: list[float], lower_is_worse: bool, integer: bool) -> str:
    worst = min(values) if lower_is_worse else max(values)
    mean = float(np.mean(values))
    if integer:
        return f"{mean:.1f} ({worst:.0f})" if len(values) > 1 else f"{worst:.0f}"
    return f"{mean:.3f} ({worst:.3f})" if len(values) > 1 else f"{mean:.3f}"


def table(results: dict) -> str:
    """Markdown table: geometry, condition, pipeline, nuclei, then mean (worst) of each metric."""
    titles = ["geometry", "condition", "pipeline", "true nuclei (covered)"]
    titles += [title for _, _, title, _ in METRICS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * 3 + "---:|" * (len(titles) - 3)]
    for (geometry, condition), by_pipeline in results.items():
        for pipeline, reports in by_pipeline.items():
            nuclei = np.mean([r["true_nuclei"] for r in reports])
            covered = np.mean([r["covered"] for r in reports])
            cells = [geometry, condition, pipeline, f"{nuclei:.0f} ({covered:.0%})"]
            for key, index, _, lower_is_worse in METRICS:
                values = [_value(r, key, index) for r in reports]
                cells.append(_cell(values, lower_is_worse, key in ("splits", "merges")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict, factors: list[float]) -> str:
    """Markdown table of the diameter sweep: per geometry and condition, F1@0.5 (and F1@0.7)
    of the default pipeline at each ``--diameter`` factor (mean over seeds), then the minimum
    over the sweep and how far it falls below the best."""
    factors = sorted({*factors, 1.0})
    titles = ["geometry", "condition", *(f"x{f:g}" for f in factors), "min", "best - min"]
    lines = ["| " + " | ".join(titles) + " |", "|---|---|" + "---:|" * (len(titles) - 2)]
    for (geometry, condition), by_pipeline in results.items():
        names = [PIPELINE_DEFAULT if f == 1 else sweep_name(f) for f in factors]
        f50 = [np.mean([r["f1_iou50"] for r in by_pipeline[n]]) for n in names]
        f70 = [np.mean([r["f1_iou70"] for r in by_pipeline[n]]) for n in names]
        cells = [f"{a:.3f} ({b:.3f})" for a, b in zip(f50, f70, strict=True)]
        cells += [f"{min(f50):.3f}", f"{max(f50) - min(f50):.3f}"]
        lines.append("| " + " | ".join([geometry, condition, *cells]) + " |")
    return "\n".join(lines)


def records(results: dict) -> str:
    """Every report as a JSON array, one report per line."""
    rows = [
        json.dumps({"geometry": geometry, "condition": condition, "pipeline": pipeline, **report})
        for (geometry, condition), by_pipeline in results.items()
        for pipeline, reports in by_pipeline.items()
        for report in reports
    ]
    return "[\n" + ",\n".join(rows) + "\n]\n"


def header(args: argparse.Namespace, elapsed: float) -> str:
    import skimage

    import nucflow

    geometries = ", ".join(
        f"{name} {'x'.join(map(str, GEOMETRIES[name].shape))} voxel "
        f"{' x '.join(f'{v:g}' for v in GEOMETRIES[name].voxel)} µm"
        for name in args.geometries
    )
    worst = "; in brackets the worst seed (min, for splits and merges max)"
    return "\n".join(
        [
            f"Command: `{' '.join(['python benchmarks/accuracy.py', *args.argv])}`",
            "",
            f"nucflow {nucflow.__version__}, scikit-image {skimage.__version__}; "
            f"seeds {', '.join(map(str, args.seeds))}; nuclei {DIAMETER:g} µm "
            f"(`--diameter {DIAMETER:g}` is all nucflow is given); {elapsed / 60:.1f} min.",
            f"Stacks: {geometries}.",
            f"Each cell: mean over {len(args.seeds)} seed(s){worst if len(args.seeds) > 1 else ''}."
            " Splits: true nuclei cut into two or more found objects; merges: found objects "
            "holding two or more true nuclei. Recall of the dimmest brightness tercile and of "
            "the deepest third (z in 3D, y in 2D) at IoU 0.5.",
        ]
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only (~2.5 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS)
    )
    parser.add_argument(
        "--geometries", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES)
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"markdown file for the table (and a .json of every report beside it); default "
        f"{DEFAULT_OUTPUT.relative_to(HERE.parent)} for a full run, none with --quick",
    )
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[],
        help="also run the default pipeline with --diameter FACTOR x 8 for each factor; "
        f"without factors: {' '.join(map(str, SWEEP))} (the sweep table follows the main one)",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.sweep == [] and "--sweep" in args.argv:
        args.sweep = list(SWEEP)
    if args.quick:
        args.seeds = [SEEDS[0]]
    elif args.output is None:
        args.output = DEFAULT_OUTPUT
    return args


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    """(geometry, condition) -> pipeline -> one accuracy report per seed."""
    results: dict = {}
    todo = [(g, c, s) for g in args.geometries for c in args.conditions for s in args.seeds]
    start = time.perf_counter()
    for i, (geometry, condition, seed) in enumerate(todo, 1):
        folder = work / f"{geometry.replace(' ', '_')}-{condition}-{seed}"
        folder.mkdir()
        reports = score_stack(
            folder, GEOMETRIES[geometry], CONDITIONS[condition], seed, tuple(args.sweep)
        )
        for pipeline, report in reports.items():
            results.setdefault((geometry, condition), {}).setdefault(pipeline, []).append(report)
        f1 = "  ".join(
            f"{PIPELINES.get(p, (p.rpartition(' ')[2] if 'x' in p else 'reference',))[0]} "
            f"{r['f1_iou50']:.3f}"
            for p, r in reports.items()
        )
        elapsed = time.perf_counter() - start
        print(
            f"[{i}/{len(todo)} {elapsed:5.0f} s] {geometry}, {condition}, seed {seed}: F1@0.5 {f1}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True)
        results = benchmark(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="nucflow-accuracy-") as tmp:
            results = benchmark(args, Path(tmp))
    text = f"{header(args, time.perf_counter() - start)}\n\n{table(results)}\n"
    if args.sweep:
        text += (
            "\nDiameter sweep: F1@0.5 (F1@0.7) of the default pipeline given "
            f"`--diameter` = factor x {DIAMETER:g}, mean over seeds\n\n"
            f"{sweep_table(results, args.sweep)}\n"
        )
    print(f"\n{text}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(records(results))
        print(f"written to {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
