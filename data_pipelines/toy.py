"""A procedural toy editing dataset: flat shapes on plain backgrounds, one edit per pair, with its exact mask.

`render_pair(seed, index, size)` is a pure function of its arguments. A scene has 1-3 objects (0-2 before an
"add"): a circle, square or triangle in one of 6 colours, no two alike in colour and shape, never overlapping,
rendered without anti-aliasing on a background of one or two greys (a horizontal split). The pair's edit (ops cycle
with the index) changes one object:

  recolor  "make the red circle blue"                  mask = its footprint
  move     "move the green square to the left"         mask = old | new footprint (shift = size / 4)
  add      "add a yellow triangle at the top right"    mask = new footprint (9 named positions)
  remove   "remove the blue square"                    mask = old footprint
  resize   "make the purple circle bigger"             mask = old | new footprint (x1.5 or /1.5)

Exactness: source and target are equal outside the mask, and the mask is exactly the union of the edited object's
old and new footprints (pixels inside it may keep their value, e.g. where a moved object overlaps itself).
The vocabulary is small (about 40 words) and every instruction names the object unambiguously.
"""
import dataclasses
from typing import Iterator

import numpy as np

from data_pipelines.records import RawPair, encode_png

FORMAT = "toy"
OPS = ("recolor", "move", "add", "remove", "resize")
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 190), "orange": (245, 135, 30)}
GREYS = ((235, 235, 235), (150, 150, 150), (35, 35, 35))
POSITIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
DIRECTIONS = {"to the left": (0, -1), "to the right": (0, 1), "up": (-1, 0), "down": (1, 0)}
PHRASES = {
    "recolor": ("make the {obj} {color}", "change the {obj} to {color}", "paint the {obj} {color}"),
    "move": ("move the {obj} {direction}", "shift the {obj} {direction}"),
    "add": ("add a {obj} at the {position}", "put a {obj} at the {position}"),
    "remove": ("remove the {obj}", "delete the {obj}", "erase the {obj}"),
    "resize": ("make the {obj} {adjective}", "{verb} the {obj}"),
}
# Object size: "radius" r as a fraction of the image size; every shape lies within 1.25 r of its centre.
R_RANGE = (0.09, 0.14)
R_LIMITS = (0.06, 0.22)
BOUND = 1.25
GAP = 0.03  # minimal free space between two objects' bounding circles
MOVE = 0.25
RESIZE = 1.5
MIN_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cy: float  # centre, pixels
    cx: float
    r: float  # pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def footprint(obj: Obj, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside the object."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = y - obj.cy, x - obj.cx
    if obj.shape == "circle":
        return dy * dy + dx * dx <= obj.r * obj.r
    if obj.shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * obj.r
    # triangle pointing up: apex (0, -r), base at dy = 0.75 r spanning |dx| <= r
    return (dy >= -obj.r) & (dy <= 0.75 * obj.r) & (np.abs(dx) <= (dy + obj.r) / 1.75)


def render(background: tuple[int, int, int], split: int, objects: list[Obj], size: int) -> np.ndarray:
    """(size, size, 3) uint8: rows < split in GREYS[background[0]], the rest in GREYS[background[1]], then objects."""
    img = np.empty((size, size, 3), np.uint8)
    img[:split] = GREYS[background[0]]
    img[split:] = GREYS[background[1]]
    for obj in objects:
        img[footprint(obj, size)] = COLORS[obj.color]
    return img


def _fits(obj: Obj, others: list[Obj], size: int) -> bool:
    b = BOUND * obj.r
    if not (b <= obj.cy <= size - b and b <= obj.cx <= size - b):
        return False
    if not R_LIMITS[0] * size <= obj.r <= R_LIMITS[1] * size:
        return False
    return all(np.hypot(obj.cy - o.cy, obj.cx - o.cx) >= BOUND * (obj.r + o.r) + GAP * size for o in others)


def _new_kind(rng: np.random.Generator, objects: list[Obj]) -> tuple[str, str]:
    """A (shape, colour) not yet in the scene."""
    taken = {(o.shape, o.color) for o in objects}
    free = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken]
    return free[rng.integers(len(free))]


def _scene(rng: np.random.Generator, num: int, size: int) -> list[Obj] | None:
    objects = []
    for _ in range(num):
        shape, color = _new_kind(rng, objects)
        for _ in range(20):
            r = rng.uniform(*R_RANGE) * size
            cy, cx = rng.uniform(BOUND * r, size - BOUND * r, size=2)
            obj = Obj(shape, color, float(cy), float(cx), float(r))
            if _fits(obj, objects, size):
                objects.append(obj)
                break
        else:
            return None
    return objects


def _edit(op: str, rng: np.random.Generator, objects: list[Obj], size: int):
    """(old object or None, new object or None, phrase fields) of a feasible edit, or None."""
    if op == "add":
        shape, color = _new_kind(rng, objects)
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        row, col = POSITIONS[position]
        r = rng.uniform(*R_RANGE) * size
        lo, hi = BOUND * r, size - BOUND * r
        new = Obj(shape, color, float(np.clip((row + 0.5) * size / 3, lo, hi)),
                  float(np.clip((col + 0.5) * size / 3, lo, hi)), float(r))
        return (None, new, dict(obj=new.name, position=position)) if _fits(new, objects, size) else None
    old = objects[rng.integers(len(objects))]
    others = [o for o in objects if o is not old]
    if op == "remove":
        return old, None, dict(obj=old.name)
    if op == "recolor":
        colors = [c for c in COLORS if (old.shape, c) not in {(o.shape, o.color) for o in objects}]
        color = colors[rng.integers(len(colors))]
        return old, dataclasses.replace(old, color=color), dict(obj=old.name, color=color)
    if op == "move":
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        dy, dx = DIRECTIONS[direction]
        new = dataclasses.replace(old, cy=old.cy + dy * MOVE * size, cx=old.cx + dx * MOVE * size)
        return (old, new, dict(obj=old.name, direction=direction)) if _fits(new, others, size) else None
    bigger = bool(rng.integers(2))
    new = dataclasses.replace(old, r=old.r * RESIZE if bigger else old.r / RESIZE)
    fields = dict(obj=old.name, adjective="bigger" if bigger else "smaller", verb="enlarge" if bigger else "shrink")
    return (old, new, fields) if _fits(new, others, size) else None


def render_pair(seed: int, index: int, size: int = 64) -> dict:
    """The toy pair `index` of dataset `seed` at `size` px.

    Returns dict(source=uint8 (size, size, 3), target=uint8 (size, size, 3), instruction=str,
    mask=uint8 (size, size) with 1 = pixels of the edited object's old or new footprint, op=str).
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    op = OPS[index % len(OPS)]
    rng = np.random.default_rng([seed, index])
    while True:  # a few tries at most: scenes are sparse, every op is feasible for most of them
        objects = _scene(rng, int(rng.integers(0 if op == "add" else 1, 3 if op == "add" else 4)), size)
        edit = objects is not None and _edit(op, rng, objects, size)
        if edit:
            break
    old, new, fields = edit
    top, bottom = rng.choice(len(GREYS), size=2, replace=bool(rng.integers(2)))
    split = int(rng.integers(size * 3 // 10, size * 7 // 10 + 1)) if top != bottom else 0
    background = (int(top), int(bottom))
    after = [new if o is old else o for o in objects if o is not old or new is not None]
    if old is None:
        after.append(new)
    mask = np.zeros((size, size), bool)
    for obj in (old, new):
        if obj is not None:
            mask |= footprint(obj, size)
    phrases = PHRASES[op]
    instruction = phrases[rng.integers(len(phrases))].format(**fields)
    return dict(source=render(background, split, objects, size), target=render(background, split, after, size),
                instruction=instruction, mask=mask.astype(np.uint8), op=op)


class Reader:
    """Toy pairs 0..num-1 of dataset `seed` at `size` px; a unit is a block of 1000 indices."""
    BLOCK = 1000

    def __init__(self, num: int, size: int = 64, seed: int = 0):
        if num < 1:
            raise ValueError(f"the toy dataset needs --num >= 1, got {num}")
        render_pair(seed, 0, size)  # validates seed and size up front
        self.num, self.size, self.seed = num, size, seed

    def units(self) -> list[str]:
        return [f"{start}-{min(start + self.BLOCK, self.num) - 1}" for start in range(0, self.num, self.BLOCK)]

    def read(self, unit: str) -> Iterator[RawPair]:
        first, last = (int(v) for v in unit.split("-"))
        for index in range(first, last + 1):
            pair = render_pair(self.seed, index, self.size)
            yield RawPair(f"{FORMAT}:s{self.seed}:{self.size}px:{index}", pair["instruction"],
                          encode_png(pair["source"]), encode_png(pair["target"]), task=pair["op"],
                          mask=encode_png(pair["mask"]))
