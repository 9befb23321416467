"""Loading configs: `configs/*.py` files (big_vision style: `get_config(arg=None)` returns a ConfigDict).

A config path may carry an argument after a colon, `configs/varedit_2b_256.py:sar`, passed to `get_config`.
Command-line overrides use absl + ml_collections config flags (`--config.FIELD=VALUE`) in the CLIs; in code use
`override(config, {"a.b": v})`.
"""
import ast
import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections


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
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[leaf] = value
    return config


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
