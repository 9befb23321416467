"""Summarises a record dataset: its size, build counts and first records; optionally an image grid.

  python -m data_pipelines.describe DIR [--n 5] [--grid OUT.png]

Prints "N records", the skip/filter counts of the build, then one line per record among the first n: id, task,
source and target sizes (h x w), whether it has a mask, and the instruction. `--grid` writes a PNG with one row per
record: source | target (| mask, for records that have one), each scaled to 160 px high, the instruction below.
"""
import argparse
import io
import sys

from PIL import Image, ImageDraw

from data_pipelines.records import decode_mask, decode_record, open_records, read_summary
from varedit_jax import storage

THUMB = 160
CAPTION = 14


def first_records(path: str, n: int) -> list[dict | str]:
    """The first n decoded records (a string describing the error for a record that does not decode)."""
    if read_summary(path)["num_records"] == 0:
        return []
    source = open_records(path)
    out = []
    for i in range(min(n, len(source))):
        try:
            out.append(decode_record(source[i]))
        except ValueError as e:
            out.append(f"record {i}: {e}")
    return out


def describe_line(record: dict) -> str:
    (sh, sw), (th, tw) = record["source_size"], record["target_size"]
    task = f" [{record['task']}]" if record["task"] else ""
    mask = " +mask" if record["mask"] is not None else ""
    return f"{record['id']}{task}: source {sh}x{sw}, target {th}x{tw}{mask}: {record['instruction']!r}"


def _thumb(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * THUMB / h)), THUMB), Image.Resampling.BILINEAR)


def grid(records: list[dict]) -> Image.Image:
    """One row per record: source | target (| mask), instruction below."""
    rows = []
    for r in records:
        tiles = [_thumb(Image.open(io.BytesIO(r[k])).convert("RGB")) for k in ("source", "target")]
        if r["mask"] is not None:
            tiles.append(_thumb(Image.fromarray(decode_mask(r["mask"]) * 255).convert("RGB")))
        width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
        row = Image.new("RGB", (width, THUMB + CAPTION + 4), (255, 255, 255))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 4
        ImageDraw.Draw(row).text((2, THUMB + 2), r["instruction"][:160], fill=(0, 0, 0))
        rows.append(row)
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.describe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a dataset directory written by data_pipelines.build (local or gs://)")
    parser.add_argument("--n", type=int, default=5, help="records to show")
    parser.add_argument("--grid", help="write an image grid of the shown records to this PNG")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be >= 0")
    try:
        storage.check_reachable(args.dir)
        summary = read_summary(args.dir)
        records = first_records(args.dir, args.n)
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['num_records']} records")
    for what in ("skipped", "filtered"):
        if summary[what]:
            print(f"{what}: " + ", ".join(f"{r} {n}" for r, n in summary[what].items()))
    for r in records:
        print(r if isinstance(r, str) else describe_line(r))
    good = [r for r in records if isinstance(r, dict)]
    if args.grid:
        if not good:
            print("error: no records to draw", file=sys.stderr)
            return 2
        buf = io.BytesIO()
        grid(good).save(buf, format="PNG")
        storage.write_bytes(args.grid, buf.getvalue())
        print(f"grid of {len(good)} records -> {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
