"""Reading and writing PyTorch-layout state dicts (flat `name -> array` maps) without running pickle code.

Sources: a `.safetensors` file; a Hugging Face folder (`model.safetensors`, or shards listed by
`*.safetensors.index.json`); a `.pth` / `.pt` / `.bin` file read with `torch.load(weights_only=True)` (the `torch`
extra), either a flat state dict or one nested in a trainer checkpoint (e.g. `['vae']`, `['ema']`,
`['trainer']['gpt_fsdp']`). Arrays come back as numpy (bf16 as `ml_dtypes.bfloat16`), dtypes preserved.

`open_state_dict` reads nothing but the index: it maps names to `Tensor`s (shape, dtype, `read()`), so a loader can
hold one tensor at a time (safetensors: each tensor read from its byte range; `.pth`: memory-mapped by torch).
`read_state_dict` reads them all.
"""
import json
import os
import pathlib
import tempfile
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from varedit_jax import storage
from varedit_jax.params import get_path

StateDict = dict[str, np.ndarray]
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class StateDictMismatch(ValueError):
    """A state dict does not have the expected keys or shapes."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading/writing .pth files needs the torch extra: pip install 'varedit_jax[torch]'") from e
    return torch


def _tensor_to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _is_flat_tensor_dict(obj) -> bool:
    torch = _torch()
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_nested(obj, nested: Sequence[Sequence[str]], path: str) -> Mapping:
    if _is_flat_tensor_dict(obj):
        return obj
    for keys in nested:
        node = obj
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            if _is_flat_tensor_dict(node):
                return node
    top = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise StateDictMismatch(f"{path}: no state dict found at the top level or under any of "
                            f"{[list(k) for k in nested]}; top-level keys: {top}")


class Tensor:
    """One tensor of a state dict, read on demand: `shape`, `dtype`, `read()` -> a new numpy array."""

    def __init__(self, shape: tuple[int, ...], dtype, read: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._read = tuple(shape), np.dtype(dtype), read

    def read(self) -> np.ndarray:
        return self._read()


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _safetensors_index(path: pathlib.Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file from its header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 100 * 2 ** 20:
            raise ValueError(f"cannot read weights {path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read weights {path}: corrupt safetensors header ({e})") from e
    base, size = 8 + n, path.stat().st_size

    def reader(dtype, shape, start: int, end: int):
        def read() -> np.ndarray:
            out = np.empty(shape, dtype)
            if out.nbytes != end - start or base + end > size:
                raise ValueError(f"cannot read weights {path}: tensor data out of range (a truncated file?)")
            with open(path, "rb") as f:
                f.seek(base + start)
                if f.readinto(memoryview(out.reshape(-1)).cast("B")) != out.nbytes:
                    raise ValueError(f"cannot read weights {path}: truncated tensor data")
            return out
        return read

    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        dtype, shape = _SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"])
        out[name] = Tensor(shape, dtype, reader(dtype, shape, *meta["data_offsets"]))
    return out


def _torch_index(path: pathlib.Path, nested: Sequence[Sequence[str]]) -> dict[str, Tensor]:
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    tensors = _find_nested(obj, nested, str(path))
    return {k: Tensor(tuple(t.shape), _tensor_to_numpy(t.reshape(-1)[:0]).dtype,
                      (lambda t=t: np.array(_tensor_to_numpy(t)))) for k, t in tensors.items()}


def _index(path: pathlib.Path, nested: Sequence[Sequence[str]]) -> dict[str, Tensor]:
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            out: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                out.update(_safetensors_index(path / shard))
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise StateDictMismatch(f"{index[0]}: keys listed in the index but absent from shards: {missing[:10]}")
            return out
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _safetensors_index(files[0])
        raise FileNotFoundError(f"{path}: expected one *.safetensors file or a *.safetensors.index.json, "
                                f"found {[f.name for f in files]}")
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return _safetensors_index(path)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_index(path, nested)
    raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a folder)")


def _named_errors(path, fn):
    try:
        return fn()
    except (StateDictMismatch, FileNotFoundError, ImportError, ValueError):
        raise
    except Exception as e:  # safetensors / torch raise their own types for corrupt files
        raise ValueError(f"cannot read weights {path}: {type(e).__name__}: {e}") from e


def open_state_dict(path: str | os.PathLike, nested: Sequence[Sequence[str]] = ()) -> dict[str, Tensor]:
    """name -> `Tensor` of a state dict file or HF folder (see the module docstring); nothing is read yet.
    nested: key paths to try inside trainer checkpoints (e.g. [("vae",), ("ema",)])."""
    path = pathlib.Path(path).expanduser()
    return _named_errors(path, lambda: _index(path, nested))


def read_state_dict(path: str | os.PathLike, nested: Sequence[Sequence[str]] = (),
                    keep: Callable[[str], bool] | None = None) -> StateDict:
    """Reads a state dict from a file or HF folder (`open_state_dict`, then every tensor `keep` accepts: the
    others are never read, e.g. a T5 decoder). Unreadable or corrupt files raise ValueError naming the file."""
    index = open_state_dict(path, nested)
    keep = keep or (lambda name: True)
    return _named_errors(path, lambda: {k: t.read() for k, t in index.items() if keep(k)})


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == ml_dtypes.bfloat16


def check_values(sd: Mapping[str, np.ndarray], what: str, int_keys: Iterable[str] = ()) -> None:
    """Raises StateDictMismatch naming the tensors that are not floating point (outside `int_keys`, the integer
    buffers a layout has) or hold NaN / inf: a cast or a NaN copied into a checkpoint would be a silent wrong model."""
    int_keys = set(int_keys)
    not_float = sorted(k for k, v in sd.items() if k not in int_keys and not _is_float(v.dtype))
    nonfinite = sorted(k for k, v in sd.items() if _is_float(v.dtype) and not np.isfinite(v).all())
    lines = []
    if not_float:
        lines.append(f"  not floating point where weights are ({len(not_float)}): "
                     f"{[f'{k} ({sd[k].dtype})' for k in not_float[:10]]}")
    if nonfinite:
        lines.append(f"  NaN or inf values ({len(nonfinite)}): {nonfinite[:10]}")
    if lines:
        raise StateDictMismatch("\n".join([f"{what}: refused"] + lines))


def check_state_dict(got: Mapping[str, np.ndarray], expected: Mapping[str, Iterable[int]], what: str,
                     int_keys: Iterable[str] = ()) -> None:
    """`check_shapes`, then `check_values` (dtypes, NaN / inf)."""
    check_shapes(got, expected, what)
    check_values(got, what, int_keys)


def check_shapes(got: Mapping, expected: Mapping[str, Iterable[int]], what: str) -> None:
    """Raises StateDictMismatch naming missing / unexpected keys and the first shape mismatch (`got`: arrays or
    `Tensor`s: only shapes are looked at)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shape_bad = [(k, tuple(got[k].shape), tuple(expected[k])) for k in expected
                 if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if missing or unexpected or shape_bad:
        lines = [f"{what}: state dict does not match"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if shape_bad:
            k, g, e = shape_bad[0]
            lines.append(f"  first shape mismatch: {k}: got {g}, expected {e} ({len(shape_bad)} in all)")
        raise StateDictMismatch("\n".join(lines))


def require_keys(sd: Mapping[str, np.ndarray], keys: Sequence[str], what: str, kind: str) -> None:
    """Raises StateDictMismatch unless every key of `keys` is in `sd` (`kind` names what `sd` should be)."""
    absent = [k for k in keys if k not in sd]
    if absent:
        raise StateDictMismatch(f"{what}: not {kind} state dict; missing keys {absent} "
                                f"(top-level names found: {sorted({k.split('.')[0] for k in sd})[:10]})")


def require_match(bad: Sequence[str], what: str) -> None:
    """Raises StateDictMismatch listing `bad` ("field: config X vs weights Y" lines) when there are any."""
    if bad:
        raise StateDictMismatch(f"{what}: the config does not match the weights: " + "; ".join(bad))


def fetch_param(params, path: Sequence) -> np.ndarray:
    """The float32 host copy of the parameter at `path` of a nested param dict; StateDictMismatch if absent."""
    try:
        return np.asarray(jax.device_get(get_path(params, path)), np.float32)
    except (KeyError, TypeError, IndexError) as e:
        raise StateDictMismatch(f"parameter {'/'.join(map(str, path))} is missing from the checkpoint") from e


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], mode: int = 0o644):
    """Calls write(tmp) on a temporary file beside `path`, gives it `mode` and moves it to `path`: a failure leaves
    no file (and an older `path` untouched). On gs:// the file is written locally, then uploaded whole."""
    if storage.is_remote(path):
        with storage.staged(path) as local:
            atomic_write(local, write, mode)
        return storage.path(path)
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> pathlib.Path:
    """Writes a flat state dict as .safetensors or (torch extra) .pth, atomically (`atomic_write`, mode 0644)."""
    suffix = pathlib.PurePath(os.fspath(path)).suffix
    if suffix not in (".safetensors",) + TORCH_SUFFIXES:
        raise ValueError(f"{path}: output must end in .safetensors or .pth")
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}

    def write(tmp: str) -> None:
        if suffix == ".safetensors":
            safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt"})  # as torch writes it
            return
        torch = _torch()
        tensors = {}
        with warnings.catch_warnings():  # read-only arrays (e.g. loaded ones): torch.save only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for k, v in arrays.items():
                if v.dtype == ml_dtypes.bfloat16:
                    tensors[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                else:
                    tensors[k] = torch.from_numpy(v)
        torch.save(tensors, tmp)
    return atomic_write(path, write)
