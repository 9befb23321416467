"""Scale schedules: every official template x pn equals the official tables (`quantizer/schedules.json`), the
nearest-template rule, token counts and offsets."""
import numpy as np
import pytest

from helpers import fixture_dir, load_index
from varedit_jax import schedules


def _tables():
    return load_index(fixture_dir("quantizer") / "schedules.json")


@pytest.mark.parity
def test_every_template_and_pn_equals_the_official_table():
    tables = _tables()
    assert [float(t) for t in schedules.TEMPLATES] == tables["h_div_w_templates_in_order"]
    assert set(tables["templates"]) == set(schedules.TEMPLATES)
    assert list(schedules.PREDEFINED_T) == tables["predefined_t"]
    stride = tables["vae_stride"]
    for template, by_pn in tables["templates"].items():
        assert set(by_pn) == set(schedules.PN_NUM_SCALES), template
        for pn, entry in by_pn.items():
            sched = schedules.scale_schedule(template, pn)
            assert [list(r) for r in schedules.official_scales(template, pn)] == entry["scales"], (template, pn)
            assert sched == schedules.as_schedule([(1, h, w) for _, h, w in entry["scales"]])
            assert list(schedules.pixel_size(sched, stride)) == entry["pixel"], (template, pn)
            assert schedules.num_tokens(sched) == entry["num_tokens"], (template, pn)


@pytest.mark.parity
def test_vae_side_tables_are_template_prefixes():
    tables = _tables()
    by_last = {}
    for template in schedules.TEMPLATES:
        for pn in schedules.PN_NUM_SCALES:
            sched = schedules.scale_schedule(template, pn)
            by_last.setdefault(sched[-1], set()).add(sched)
    for key, scales in tables["vae_predefined_HW_Scales_dynamic"].items():
        h, w = (int(v) for v in key.split(","))
        assert tuple(map(tuple, scales)) in by_last.get((h, w), set()), key


@pytest.mark.parity
def test_nearest_template_is_the_official_argmin():
    templates = np.array(_tables()["h_div_w_templates_in_order"])
    for ratio in np.concatenate([np.linspace(0.2, 3.5, 661), templates, (templates[:-1] + templates[1:]) / 2]):
        want = templates[int(np.argmin(np.abs(ratio - templates)))]
        assert float(schedules.nearest_template(float(ratio))) == want, ratio


def test_nearest_template_examples():
    assert schedules.nearest_template(1.0) == "1.0"
    assert schedules.nearest_template(600 / 800) == "0.75"
    assert schedules.nearest_template(1776 / 592) == "3.0"
    assert schedules.nearest_template(10.0) == "3.0" and schedules.nearest_template(0.01) == "0.333"


@pytest.mark.parametrize("template", schedules.TEMPLATES)
def test_schedules_are_prefixes_transposes_and_counted(template):
    full = schedules.full_schedule(template)
    assert len(full) == 13 and full[0] == (1, 1)
    for pn, n in schedules.PN_NUM_SCALES.items():
        assert schedules.scale_schedule(template, pn) == full[:n]
    h, w = full[-1]
    assert abs(h / w - float(template)) < 0.05  # the grid follows its template
    inverse = {float(t): t for t in schedules.TEMPLATES}.get(round(1 / float(template), 3))
    if inverse is not None and inverse != template:
        assert schedules.full_schedule(inverse) == tuple((b, a) for a, b in full)
    offsets = schedules.scale_offsets(full)
    ids = schedules.scale_ids(full)
    assert offsets[-1] == schedules.num_tokens(full) == len(ids) == sum(a * b for a, b in full)
    assert all((ids[offsets[k]:offsets[k + 1]] == k).all() for k in range(len(full)))


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown aspect template"):
        schedules.scale_schedule("1.1", "1M")
    with pytest.raises(ValueError, match="unknown pn"):
        schedules.scale_schedule("1.0", "2M")
    with pytest.raises(ValueError, match="only t = 1"):
        schedules.as_schedule([(2, 4, 4)])
    with pytest.raises(ValueError, match="resolution must be one of"):
        schedules.pn_for_resolution(300)
