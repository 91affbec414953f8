"""A StarDist model under nucflow: seam errors against the same model on the whole image,
beside ``predict_instances_big`` on the same blocks; accuracy beside the builtin; cost.

Run ``python benchmarks/stardist_seams.py`` (needs ``nucflow[stardist]``; ~3 min on the shared
2-core machine; writes ``benchmarks/results/stardist_seams.md``). No pretrained weights can be
downloaded here, so it first trains a small 2D model (16 rays, grid 2, U-Net depth 2, 200 steps)
on three synthetic 256x256 images. Then:

1. **Seams.** On a fresh 512x512 image, the model on the whole image (``predict_instances``
   on the image scaled by nucflow's whole-stack percentiles) is the reference. nucflow runs it
   per block (``segment.method: stardist``) on several ``--chunks`` and ``segment.halo_um``;
   ``predict_instances_big`` runs it on the same blocks (block = core + 2 halos, overlap and
   context as given). A seam error is a reference object without a match at IoU 0.5 (split
   or cut) or a label matching none (a fragment or duplicate).
2. **Accuracy** against the synthetic truth: F1@0.5 and F1@0.7 of the model under nucflow and
   of the builtin segmenter, uniform and light-sheet-like conditions.
3. **Cost** of the segment stage per Mvoxel on CPU (run.json's timings; threads).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from nucflow import evaluate, io, synth
from nucflow.cli import main as nucflow_main

OUTPUT = Path(__file__).resolve().parent / "results" / "stardist_seams.md"


def train(folder: Path):
    from stardist.models import Config2D, StarDist2D

    images, truths = [], []
    for seed in (10, 11, 12):
        made = synth.make_nuclei((256, 256), n_nuclei=70, diameter=8.0, seed=seed)
        low, high = np.percentile(made.image, [1, 99.8])
        images.append(((made.image - low) / (high - low)).astype(np.float32))
        truths.append(made.truth.astype(np.int32))
    config = Config2D(
        n_rays=16, grid=(2, 2), n_channel_in=1, unet_n_depth=2, unet_n_filter_base=16,
        train_patch_size=(64, 64), train_batch_size=8, train_tensorboard=False,
    )  # fmt: skip
    model = StarDist2D(config, name="tiny", basedir=str(folder))
    model.train(images[:2], truths[:2], validation_data=(images[2:], truths[2:]), epochs=8,
                steps_per_epoch=25)  # fmt: skip
    return model


def run(source: Path, out: Path, *extra: str) -> tuple[np.ndarray, dict]:
    argv = ["run", "--input", str(source), "--output", str(out), "--set", "qc.enabled=false"]
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stderr(log):
        assert nucflow_main([*argv, *extra]) == 0
    labels = np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))
    return labels, json.loads((out / "run.json").read_text())


def seam_errors(labels: np.ndarray, reference: np.ndarray) -> int:
    found = evaluate.match_instances(labels, reference, iou=0.5)
    return int(found["false_positives"] + found["false_negatives"])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="stardist-seams-"))
    start = time.perf_counter()
    model = train(work / "models")
    folder = work / "models" / "tiny"
    print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lines = ["| blocks | halo (px) | nucflow seam errors | predict_instances_big seam errors |"]
    lines.append("|---|---:|---:|---:|")
    made = synth.make_nuclei((512, 512), n_nuclei=280, diameter=8.0, seed=20)
    source = work / "seams.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    model_args = ["--set", "segment.method=stardist", "--set", f"segment.model={folder}"]
    _, recorded = run(source, work / "whole", *model_args, "--chunks", "512", "512")
    low, high = recorded["normalize_percentiles"]
    scaled = ((made.image.astype(np.float32) - low) / (high - low)).astype(np.float32)
    reference, _ = model.predict_instances(scaled, axes="YX", verbose=False)
    for chunks, halo_px in [(64, 24), (64, 32), (64, 48), (128, 48), (96, 48)]:
        labels, _ = run(
            source, work / f"c{chunks}h{halo_px}", *model_args, "--chunks", str(chunks),
            str(chunks), "--set", f"segment.halo_um={halo_px * made.voxel_size[0]}",
        )  # fmt: skip
        try:
            big, _ = model.predict_instances_big(
                scaled, axes="YX", block_size=chunks + 2 * halo_px, min_overlap=32,
                context=halo_px, show_progress=False,
            )  # fmt: skip
            big_errors = str(seam_errors(big, reference))
        except (AssertionError, RuntimeError) as error:
            big_errors = f"refused ({type(error).__name__})"
        lines.append(
            f"| {chunks}x{chunks} | {halo_px} | {seam_errors(labels, reference)} | {big_errors} |"
        )
    lines += ["", "| condition | F1@0.5 stardist | builtin | F1@0.7 stardist | builtin |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, conditions in [("uniform", synth.UNIFORM), ("lightsheet", synth.LIGHTSHEET)]:
        made = synth.make_nuclei(
            (512, 512), n_nuclei=280, diameter=8.0, seed=21, conditions=conditions
        )
        source = work / f"{name}.ome.zarr"
        io.write_ome_zarr(source, made.image, made.voxel_size)
        scores = []
        for label, extra in [("stardist", model_args), ("builtin", [])]:
            labels, recorded = run(source, work / f"{name}-{label}", *extra, "--diameter", "8")
            scores.append(
                [evaluate.match_instances(labels, made.truth, iou=t)["f1"] for t in (0.5, 0.7)]
            )
            if label == "stardist" and name == "uniform":
                seconds = recorded["timings_s"]["segment"]
                mvoxels = made.image.size / 1e6
        (s5, s7), (b5, b7) = scores
        lines.append(f"| {name} | {s5:.3f} | {b5:.3f} | {s7:.3f} | {b7:.3f} |")
    lines += ["", f"segment stage: {seconds / mvoxels:.2f} s per Mvoxel on CPU (threads)"]
    OUTPUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
