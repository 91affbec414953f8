"""The declared stages (nucflow.stages) are the ones the flows run: what a real run stores and
the passes it makes follow the declarations, for several configurations."""

from __future__ import annotations

import json

import pytest

from nucflow import config, stages


def _params(overrides: list[str], shape: tuple[int, ...]) -> config.Params:
    loaded = config.load(options={"chunks": [8, 32, 32]}, overrides=overrides)
    return config.resolve(loaded, shape=shape, voxel_size=(1.0, 0.5, 0.5))


CONFIGS = {
    "default": [],
    "no background, no hole filling": ["preprocess.background=none", "mask.fill_holes=false"],
    "exact top-hat, global threshold, no size filter": [
        "preprocess.background_downsample=1",
        "threshold.method=otsu",
        "mask.min_volume=0",
    ],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_run_stores_and_passes_what_its_stages_declare(stack3d, run_cli, tmp_path, name):
    sets = CONFIGS[name]
    out = tmp_path / "out"
    run_cli(stack3d[0], out, *(a for s in sets for a in ("--set", s)))
    record = json.loads((out / "run.json").read_text())
    shape = tuple(b - a for a, b in record["data_region"])
    params = _params(sets, shape)
    declared = [r.name for st in stages.NUCLEI for r in st.results(params) if r.stored]
    assert list(record["stages"]) == declared  # fingerprinted results, in the order made
    passes = {n: len(s["passes"]) for n, s in record["progress"]["stages"].items()}
    assert passes == {st.name: len(st.passes(params)) for st in stages.NUCLEI}


def test_each_stage_reads_the_input_or_an_earlier_stage():
    for flow in (stages.NUCLEI, stages.PREPROCESS):
        made = {"input"}
        for stage in flow:
            assert set(stage.reads) <= made, (stage.name, set(stage.reads) - made)
            made.add(stage.name)
