"""The declared stages (nucflow.stages) are the ones the flows run: what a real run stores and
the passes it makes follow the declarations, for several configurations."""

from __future__ import annotations

import json

import pytest

from nucflow import config, flowrun, pipeline, pyramid


def _params(overrides: list[str], shape: tuple[int, ...]) -> config.Params:
    loaded = config.load(options={"chunks": [8, 32, 32]}, overrides=overrides)
    return config.resolve(loaded, shape=shape, voxel_size=(1.0, 0.5, 0.5))


CONFIGS = {
    "default": [],
    "label pyramid of two levels": [],  # with levels down to 32 x 32 (see the test)
    "cell minima in a pass of their own (blocks not whole cells)": [
        "preprocess.background_downsample=3"
    ],
    "no background, no hole filling": ["preprocess.background=none", "mask.fill_holes=false"],
    "exact top-hat, global threshold, no size filter": [
        "preprocess.background_downsample=1",
        "threshold.method=otsu",
        "mask.min_volume=0",
    ],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_run_stores_and_passes_what_its_stages_declare(
    stack3d, run_cli, tmp_path, name, monkeypatch
):
    if name == "label pyramid of two levels":
        monkeypatch.setattr(pyramid, "MAX_PLANE", 32)  # stack3d is 40 x 128 x 128
    sets = CONFIGS[name]
    out = tmp_path / "out"
    run_cli(stack3d[0], out, *(a for s in sets for a in ("--set", s)))
    record = json.loads((out / "run.json").read_text())
    shape = tuple(b - a for a, b in record["data_region"])
    params = _params(sets, shape)
    full = tuple(record["shape"])
    declared = [r.name for st in pipeline.NUCLEI for r in st.results(params, full) if r.stored]
    assert list(record["stages"]) == declared  # fingerprinted results, in the order made
    passes = {n: len(s["passes"]) for n, s in record["progress"]["stages"].items()}
    expected = {st.name: len(st.passes(params, full)) for st in pipeline.NUCLEI}
    # a component selection that keeps everything skips its third pass (its result is its
    # source): the pass is recorded as skipped, so the plan the stage started with holds
    mask = record["progress"]["stages"]["mask"]["passes"]
    skipped = {p["label"] for p in mask if p.get("skipped")}
    assert skipped <= {"holes fill", "small objects remove"}, mask
    assert passes == expected == record["progress"]["plan"]
    if name == "label pyramid of two levels":
        assert passes["pyramid"] == 2 == len(record["pyramid_shapes"]) - 1
    if "preprocess.background" not in " ".join(sets):
        assert passes["preprocess"] == 3  # the Gaussian's pass stored the cell minima
    if name.startswith("cell minima"):
        assert passes["preprocess"] == 4


def test_each_stage_reads_the_input_or_an_earlier_stage():
    for flow in (flowrun.load_flow(name).STAGES for name in ("nuclei", "preprocess", "mask")):
        made = {"input"}
        for stage in flow:
            assert set(stage.reads) <= made, (stage.name, set(stage.reads) - made)
            made.add(stage.name)
