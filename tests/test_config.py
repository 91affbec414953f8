"""Each default is stated once: the code's derivation factors and defaults agree with
configs/nuclei.yaml, and the flat names run.json and the fingerprints use stay what they were."""

from __future__ import annotations

import re

import pytest

from nucflow import config, objects


def _default_params() -> config.Params:
    loaded = config.load(None, options={})
    return config.resolve(loaded, shape=(64, 256, 256), voxel_size=(1.0, 1.0, 1.0))


def test_the_yaml_says_the_factors_the_code_derives_with():
    text = config.resource_path("configs", "nuclei.yaml").read_text()
    said = {}
    section = ""
    # a key's comment may go on over the comment-only lines below it
    entry = re.compile(r"^(\w+):|^\s+(\w+): null\s+#(.*(?:\n\s+#.*)*)", re.M)
    for found in entry.finditer(text):
        if found[1]:
            section = found[1]
            continue
        factor = re.search(r"null = (?:volume of a )?([\d.]+) x diameter", found[3])
        if factor:
            said[section, found[2]] = float(factor[1])
    assert said == config.DERIVED


@pytest.mark.parametrize(("section", "key"), sorted(config.DERIVED))
def test_a_derived_length_is_its_factor_times_the_diameter(section, key):
    loaded = config.load(None, options={"diameter": 10.0})
    group = getattr(config.resolve(loaded, shape=(64, 256, 256), voxel_size=(1.0,) * 3), section)
    value = getattr(group, key)
    factor = config.DERIVED[section, key]
    if key == "min_volume":  # the volume of a ball of that diameter
        assert value == pytest.approx(4 / 3 * 3.141592653589793 * (factor * 10.0 / 2) ** 3)
    else:
        assert value == pytest.approx(factor * 10.0)


def test_measurement_settings_default_to_the_yaml():
    measure = _default_params().measure
    assert objects.Settings() == objects.Settings(
        measure.percentiles, measure.shell_width, measure.neighbour_distance
    )


def test_every_section_is_one_group_and_the_flat_names_are_unchanged():
    params = _default_params()
    loaded = config.load(None, options={})
    for section in ("preprocess", "threshold", "detect", "mask", "segment", "measure", "output"):
        group = getattr(params, section)
        assert set(vars(group)) <= set(loaded[section]), section
    assert list(params.flat()) == [
        "diameter", "voxel_size", "chunks", "sigma", "background", "background_radius",
        "background_downsample", "tissue_mask", "threshold_method", "threshold_value",
        "threshold_factor", "blob_radius", "snr", "fraction", "opening_radius", "fill_holes",
        "min_volume", "peak_radius", "min_radius", "max_radius", "segment_method",
        "segment_options", "segment_input", "normalize", "normalize_percentiles", "halo_um",
        "segment_model", "segment_device", "channels", "single_file_rows", "properties",
        "percentiles", "shell_width", "neighbour_distance", "drop_border", "relabel", "qc",
        "filter_steps",
    ]  # fmt: skip
