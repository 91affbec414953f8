"""``segment.method: stardist``: a small StarDist model trained here (no weights can be
downloaded) runs through nucflow with no seam errors against the same model on the whole
image. Skipped without the ``stardist`` extra (TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from nucflow import evaluate, io, synth
from nucflow.cli import main

pytest.importorskip("stardist")

pytestmark = pytest.mark.filterwarnings("ignore")  # TensorFlow's and Keras' own warnings


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 2D StarDist model trained for 200 steps on two synthetic images (~15 s on CPU)."""
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
    folder = tmp_path_factory.mktemp("models")
    trained = StarDist2D(config, name="tiny", basedir=str(folder))
    trained.train(
        images[:2], truths[:2], validation_data=(images[2:], truths[2:]), epochs=8,
        steps_per_epoch=25,
    )  # fmt: skip
    return folder / "tiny"


def _run(source: Path, out: Path, chunks: tuple[int, int], model: Path) -> np.ndarray:
    argv = ["run", "--input", str(source), "--output", str(out), "--chunks", *map(str, chunks)]
    argv += ["--set", "segment.method=stardist", "--set", f"segment.model={model}"]
    argv += ["--set", "segment.halo_um=24", "--set", "qc.enabled=false"]
    assert main(argv) == 0
    return np.asarray(zarr.open_array(str(out / "labels.ome.zarr" / "0"), mode="r"))


@pytest.mark.slow  # ~35 s: training the model is most of it
def test_stardist_under_nucflow_has_no_seam_errors(model, tmp_path):
    from stardist.models import StarDist2D

    made = synth.make_nuclei((256, 256), n_nuclei=70, diameter=8.0, seed=13)
    source = tmp_path / "img.ome.zarr"
    io.write_ome_zarr(source, made.image, made.voxel_size)
    # blocks and halo (48 px) multiples of grid x 2^depth = 8: the network's phase is kept
    one = _run(source, tmp_path / "one", (256, 256), model)
    low, high = json.loads((tmp_path / "one/run.json").read_text())["normalize_percentiles"]
    scaled = ((made.image.astype(np.float32) - low) / (high - low)).astype(np.float32)
    whole, _ = StarDist2D(None, name=model.name, basedir=str(model.parent)).predict_instances(
        scaled, axes="YX", verbose=False
    )
    assert whole.max() > 40
    assert evaluate.match_instances(one, whole, iou=0.99)["f1"] == 1.0
    for chunks in [(64, 64), (96, 80)]:
        labels = _run(source, tmp_path / f"c{chunks[0]}", chunks, model)
        found = evaluate.match_instances(labels, whole, iou=0.5)
        # seam errors: a split object leaves a false negative or a fragment, a duplicate a
        # false positive
        assert found["false_positives"] == found["false_negatives"] == 0, (chunks, found)
        assert np.array_equal(labels > 0, whole > 0)
