"""Loading configs: `configs/*.py` files (big_vision style: `get_config(arg=None)` returns a ConfigDict).

A config path may carry an argument after a colon, `configs/varedit_2b_256.py:sar`, passed to `get_config`.
Command-line overrides use absl + ml_collections config flags (`--config.FIELD=VALUE`) in the CLIs (parsed by
`parse_flags`, which turns a bad flag into a one-line error naming the closest valid fields) or `parse_overrides`;
in code use `override(config, {"a.b": v})`. An unknown field is always refused, never ignored.
"""
import ast
import difflib
import importlib.util
import pathlib
import sys
from typing import Any, Mapping

import ml_collections
from absl import flags


def load(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Runs `get_config` of a config file; `path:arg` passes `arg`."""
    path_str, _, arg = str(path).partition(":")
    file = pathlib.Path(path_str)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    spec = importlib.util.spec_from_file_location(f"_varedit_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def override(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-path fields replaced; unknown fields raise KeyError."""
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(unknown_field(config, dotted))
        node[leaf] = value
    return config


def fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field name of `config` (groups included)."""
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += fields(v, prefix + k + ".")
    return out


def unknown_field(config: ml_collections.ConfigDict, dotted: str) -> str:
    """The message for a field `config` lacks, with the closest valid names."""
    close = difflib.get_close_matches(dotted, fields(config), n=3, cutoff=0.5)
    return f"config has no field {dotted!r}" + (f" (closest: {', '.join(close)})" if close else "")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--config.a.b=1e-3", ...] -> {"a.b": 0.001}; values are Python literals (else strings). ValueError for
    anything else, so a mistyped flag is never silently ignored."""
    out = {}
    for arg in args:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"unexpected argument {arg!r} (config overrides look like --config.FIELD=VALUE)")
        dotted, value = arg[len("--config."):].split("=", 1)
        try:
            out[dotted] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[dotted] = value
    return out


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag or an unknown / mistyped
    `--config.FIELD` exits 2 with one line (the closest valid fields named) instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        path = _config_arg(argv[1:])
        config = None
        try:
            config = load(path) if path else None
        except Exception:  # noqa: BLE001 - the config file's own error is reported by its flag
            pass
        overrides = [a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [d for d in overrides if config is not None and _missing(config, d)]
        if unknown:
            message = "; ".join(unknown_field(config, d) for d in unknown)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _missing(config: ml_collections.ConfigDict, dotted: str) -> bool:
    try:
        override(config, {dotted: None})
    except KeyError:
        return True
    return False
