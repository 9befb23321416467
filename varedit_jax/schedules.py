"""Scale schedules: the official aspect-ratio templates and their per-scale latent grids.

A *schedule* is a tuple of (h, w) latent grid sizes, coarse to fine, e.g. the 256 px square schedule
((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)). Official code stores (t, h, w) with t from
`PREDEFINED_T`, but trainer and sampler always use t = 1, so t is dropped here (`official_scales` restores it).

Each template (h/w of the latent grid) has 13 scales at 1M (1024 px class); the `pn` names select prefixes:
0.06M = 7 scales (256 px), 0.25M = 10 (512 px), 0.60M = 12 (768 px), 1M = 13 (1024 px). Pixel size is the last
grid times the tokenizer's stride in pixels (16 for the official tokenizers).
Source: Infinity `infinity/utils/dynamic_resolution.py` (values checked against fixtures/quantizer/schedules.json).
"""
from typing import Sequence

import numpy as np

Schedule = tuple[tuple[int, int], ...]

# 1M schedules of the templates h/w >= 1; a template's inverse (w/h) is the transpose of each grid.
_TALL_1M: dict[str, Schedule] = {
    "1.0": ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    "1.25": ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
             (55, 44), (70, 56)),
    "1.333": ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
              (60, 45), (72, 54)),
    "1.5": ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    "1.75": ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
             (70, 40), (84, 48)),
    "2.0": ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    "2.5": ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    "3.0": ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}
_INVERSE = {"1.25": "0.8", "1.333": "0.75", "1.5": "0.666", "1.75": "0.571", "2.0": "0.5", "2.5": "0.4",
            "3.0": "0.333"}

# Templates in the official order (ties in `nearest_template` go to the first one, as numpy.argmin does).
TEMPLATES: tuple[str, ...] = ("1.0", "1.25", "0.8", "1.333", "0.75", "1.5", "0.666", "1.75", "0.571", "2.0", "0.5",
                              "2.5", "0.4", "3.0", "0.333")
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
RESOLUTION_TO_PN: dict[int, str] = {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M"}
PREDEFINED_T: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15, 17, 21)
OFFICIAL_STRIDE = 16  # pixels per latent cell of the official tokenizers (d56: 8 x 2x2 patchify)

_FULL: dict[str, Schedule] = dict(_TALL_1M)
_FULL.update({inv: tuple((w, h) for h, w in _TALL_1M[tall]) for tall, inv in _INVERSE.items()})


def template_key(template: float | str) -> str:
    """Canonical key of a template given as float (1.333) or string ('1.333')."""
    key = template if isinstance(template, str) else repr(float(template))
    if key not in _FULL:
        raise ValueError(f"unknown aspect template {template!r}; known: {', '.join(TEMPLATES)}")
    return key


def full_schedule(template: float | str) -> Schedule:
    """The 13-scale (1M) schedule of a template; RoPE positions are always laid out on its last grid."""
    return _FULL[template_key(template)]


def scale_schedule(template: float | str, pn: str) -> Schedule:
    """The schedule of template `template` at size class `pn` ('0.06M', '0.25M', '0.60M', '1M')."""
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown pn {pn!r}; known: {', '.join(PN_NUM_SCALES)}")
    return full_schedule(template)[:PN_NUM_SCALES[pn]]


def pn_for_resolution(resolution: int) -> str:
    if resolution not in RESOLUTION_TO_PN:
        raise ValueError(f"resolution must be one of {sorted(RESOLUTION_TO_PN)}, got {resolution}")
    return RESOLUTION_TO_PN[resolution]


def nearest_template(h_div_w: float) -> str:
    """Template closest to an image's h/w ratio (first minimum wins, as the official argmin)."""
    values = np.array([float(t) for t in TEMPLATES])
    return TEMPLATES[int(np.argmin(np.abs(h_div_w - values)))]


def pixel_size(schedule: Sequence[tuple[int, int]], stride: int = OFFICIAL_STRIDE) -> tuple[int, int]:
    """(H_img, W_img) of a schedule: its last grid times the tokenizer stride."""
    h, w = schedule[-1]
    return h * stride, w * stride


def num_tokens(schedule: Sequence[tuple[int, int]]) -> int:
    """Tokens of a schedule, sum of h*w over scales (SOS occupies the 1x1 slot)."""
    return int(sum(h * w for h, w in schedule))


def scale_offsets(schedule: Sequence[tuple[int, int]]) -> np.ndarray:
    """(K+1,) start index of every scale in the flat token sequence, plus the total."""
    return np.concatenate([[0], np.cumsum([h * w for h, w in schedule])]).astype(np.int64)


def scale_ids(schedule: Sequence[tuple[int, int]]) -> np.ndarray:
    """(L,) scale index of every token position, scale-major then row-major."""
    return np.repeat(np.arange(len(schedule)), [h * w for h, w in schedule])


def official_scales(template: float | str, pn: str) -> list[tuple[int, int, int]]:
    """(t, h, w) triples exactly as the official table stores them (t from PREDEFINED_T)."""
    return [(PREDEFINED_T[i], h, w) for i, (h, w) in enumerate(scale_schedule(template, pn))]


def as_schedule(rows: Sequence[Sequence[int]]) -> Schedule:
    """Normalises (t, h, w) or (h, w) rows (e.g. a fixture's `scale_schedule`) to a Schedule."""
    out = []
    for row in rows:
        row = [int(v) for v in row]
        if len(row) == 3:
            if row[0] != 1:
                raise ValueError(f"only t = 1 schedules are supported, got row {row}")
            row = row[1:]
        if len(row) != 2:
            raise ValueError(f"schedule rows must be (h, w) or (t, h, w), got {row}")
        out.append((row[0], row[1]))
    return tuple(out)
