"""Result tables (Markdown + CSV + JSON) and image grids (one PNG per strategy).

Tables: `rows` are dicts (one per strategy / reference row); columns default to the union of their keys in
first-seen order. Markdown and CSV print floats with `digits` decimals (NaN as "nan", missing cells empty); JSON
keeps full precision with NaN / inf as null and numpy scalars as Python numbers.
Grids: one row per sample - source | [target] | output, the instruction drawn under the images (wrapped to the row
width), column titles on top; every image is resized to `cell` x `cell` (nearest for upscaling small toy images,
so pixels stay visible; LANCZOS for downscaling).
"""
import csv
import io
import json
import math
from typing import Any, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from varedit_jax import images as imgs
from varedit_jax import storage

PAD = 6
FONT_SIZE = 13


def _plain(value: Any) -> Any:
    """numpy scalars / arrays -> Python values; non-finite floats -> None (JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _columns(rows: Sequence[dict], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def format_cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub Markdown table; numeric columns right-aligned."""
    cols = _columns(rows, columns)
    numeric = [all(isinstance(r.get(c), (int, float, np.number)) or r.get(c) is None for r in rows) for c in cols]
    escape = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(c) for c in cols) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(escape(format_cell(row.get(c), digits)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], out_dir, name: str = "results", *, columns: Sequence[str] | None = None,
                title: str | None = None, digits: int = 3) -> dict[str, epath.Path]:
    """Writes OUT_DIR/NAME.md (optional "# title" heading), NAME.csv and NAME.json (local or gs://); returns
    {"md", "csv", "json"}."""
    out_dir = storage.path(out_dir)
    cols = _columns(rows, columns)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "csv", "json")}
    heading = f"# {title}\n\n" if title else ""
    storage.write_text(paths["md"], heading + markdown_table(rows, cols, digits))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(cols)
    writer.writerows([[format_cell(row.get(c), digits) for c in cols] for row in rows])
    storage.write_text(paths["csv"], buf.getvalue())
    storage.write_text(paths["json"], json.dumps(dict(title=title, columns=cols, rows=[_plain(dict(r)) for r in rows]),
                                                 indent=1, allow_nan=False) + "\n")
    return paths


# ------------------------------------------------------------------------------------------------------ grids
def _tile(image, cell: int) -> Image.Image:
    im = Image.fromarray(imgs.to_uint8(image)).convert("RGB")
    if im.size == (cell, cell):
        return im
    upscale = max(im.size) <= cell
    return im.resize((cell, cell), Image.Resampling.NEAREST if upscale else Image.Resampling.LANCZOS)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (words longer than a line are broken by characters)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split() or [""]:
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = 1
                while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def image_grid(sources: Sequence, instructions: Sequence[str], outputs: Sequence, *, targets: Sequence | None = None,
               cell: int = 192, title: str | None = None) -> Image.Image:
    """A grid image: per sample source | [target] | output with its instruction underneath (module docstring)."""
    if not len(sources) == len(instructions) == len(outputs) or (targets is not None
                                                                  and len(targets) != len(sources)):
        raise ValueError("sources, instructions, outputs (and targets) must have the same length")
    if not sources:
        raise ValueError("an image grid needs at least one sample")
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = FONT_SIZE + 4
    headers = ["source"] + (["target"] if targets is not None else []) + ["output"]
    width = len(headers) * (cell + PAD) + PAD
    wrapped = [_wrap(str(text), font, width - 2 * PAD) for text in instructions]
    top = (line_h if title else 0) + line_h + PAD
    height = top + sum(cell + PAD + len(lines) * line_h + PAD for lines in wrapped)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD // 2), title, fill="black", font=font)
    for j, header in enumerate(headers):
        draw.text((PAD + j * (cell + PAD), top - line_h - PAD // 2), header, fill="dimgray", font=font)
    y = top
    for i, lines in enumerate(wrapped):
        row = [sources[i]] + ([targets[i]] if targets is not None else []) + [outputs[i]]
        for j, image in enumerate(row):
            canvas.paste(_tile(image, cell), (PAD + j * (cell + PAD), y))
        y += cell + PAD // 2
        for line in lines:
            draw.text((PAD, y), line, fill="black", font=font)
            y += line_h
        y += PAD + PAD // 2
        draw.line([(0, y - PAD // 2), (width, y - PAD // 2)], fill="lightgray")
    return canvas


def save_grid(path, sources: Sequence, instructions: Sequence[str], outputs: Sequence, *,
              targets: Sequence | None = None, cell: int = 192, title: str | None = None) -> epath.Path:
    """`image_grid` written as a PNG to `path` (local or gs://)."""
    path = storage.path(path)
    buf = io.BytesIO()
    image_grid(sources, instructions, outputs, targets=targets, cell=cell, title=title).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path
