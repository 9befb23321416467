"""Builds one of the TFDS datasets of `data_pipelines.tfds_builders` without TensorFlow.

  python -m data_pipelines.tfds_build --builder seed_edit|imgedit|emu_edit|pie_bench --manual_dir RAW --data_dir OUT

RAW holds the raw files as downloaded (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS; `--help` lists them); OUT
receives OUT/NAME/1.0.0/ (ArrayRecord shards + dataset_info.json), readable with
`tfds.data_source(NAME, split=..., data_dir=OUT)` and usable as `tfds:NAME@OUT` wherever record datasets are
accepted. Re-running on a finished build does nothing. Exit code 2 on bad input (one line).
"""
import argparse
import sys

from data_pipelines import tfds_builders


def main(argv=None) -> int:
    epilog = "\n".join(f"{name}: {' '.join(b.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}"
                       for name, b in tfds_builders.BUILDERS.items())
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.tfds_build", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builder", required=True, choices=sorted(tfds_builders.BUILDERS))
    parser.add_argument("--manual_dir", required=True, help="the raw dataset as downloaded")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to build into")
    args = parser.parse_args(argv)
    try:
        path = tfds_builders.build(args.builder, args.manual_dir, args.data_dir)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {args.builder} in {path}; read it with tfds.data_source({args.builder!r}, data_dir="
          f"{args.data_dir!r}) or use tfds:{args.builder}@{args.data_dir} as a dataset path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
