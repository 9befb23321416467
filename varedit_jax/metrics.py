"""Training metrics: JSONL + TensorBoard (tensorboardX) on process 0, a console progress bar, and MFU.

`workdir/metrics.jsonl` gets one JSON object per logged step ({"step", "split": "train"|"val", ...}); a resumed run
first drops the rows after its checkpoint's step (it logs them again) and writes a {"split": "restart"} row, so each
step appears once. TensorBoard scalars go to `workdir/tb/` as `<split>/<name>` (a resumed run's writer starts with
`purge_step`, so TensorBoard discards the earlier events from that step on). MFU = model FLOP/s per device (`transformer_flops`: forward +
backward = 3 forwards of the transformer's matmuls, dense attention, remat recomputation and the frozen encoders not
counted, as MaxText / PaLM define it) / the device's peak: `PEAK_FLOPS` by device kind (bf16 dense), or, on a CPU, a
measured fp32 matmul rate. XLA's own count of a compiled program (`compiled_flops`, reported by the planner and the
benchmark) is not used for MFU: it counts a loop body once (scanned layers) and Pallas kernels (splash) as zero.
"""
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from varedit_jax import storage

# Dense bf16 peak FLOP/s per JAX device (one chip; v4 / v5p devices are megacore chips).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


def measured_matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of an n x n matmul on the default device (the practical peak used for MFU on CPUs)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def peak_flops(device=None) -> float:
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_flops()
    return PEAK_FLOPS.get(device.device_kind, float("nan"))


def transformer_flops(model_cfg, layout, text_len: int) -> float:
    """Matmul FLOPs of one forward of one sample: every block (qkv, attention scores and attention x values over the
    whole sequence, output projection, cross-attention q / kv / scores / values / projection, FFN) and the head."""
    l, c, f, ct = layout.length, model_cfg.embed_dim, model_cfg.mlp_dim, model_cfg.text_dim
    self_attention = 2 * l * c * 3 * c + 4 * l * l * c + 2 * l * c * c
    cross_attention = 2 * l * c * c + 2 * text_len * ct * 2 * c + 4 * l * text_len * c + 2 * l * c * c
    ffn = 4 * l * c * f
    head = 2 * layout.n_target * c * 2 * model_cfg.bits
    return float(model_cfg.depth * (self_attention + cross_attention + ffn) + head)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program per device (XLA's cost analysis), or None if unavailable."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None


def _summary_writer():
    """tensorboardX's SummaryWriter class, imported without torch: tensorboardX imports torch when it is installed
    (only to accept torch tensors, which nothing here passes), seconds of every training process's start."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError inside tensorboardX's optional imports
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """Metric sinks of one run. Only process 0 writes; `write` takes host floats.

    The files are written through a `storage.Mirror` of the workdir: in place for a local workdir; on gs:// in a
    local folder uploaded by `push()` (the trainer pushes after every checkpoint save, and `write` every
    `push_every_s` seconds; `close` pushes last), since GCS objects cannot be appended to."""

    def __init__(self, workdir, total_steps: int, first_step: int, *, enabled: bool = True,
                 push_every_s: float = 60.0):
        self.enabled = enabled
        self.push_every_s, self._pushed_at = push_every_s, time.monotonic()
        if enabled:
            self.files = storage.Mirror(workdir)
            local = self.files.local
            if first_step:
                self.files.pull("metrics.jsonl")
            dropped = _truncate_after(local / "metrics.jsonl", first_step) if first_step else 0
            self.jsonl = open(local / "metrics.jsonl", "a")
            if first_step:  # a resumed run: mark the restart (the rows after its checkpoint were dropped)
                self.jsonl.write(json.dumps({"step": first_step, "split": "restart", "dropped_rows": dropped}) + "\n")
            self.tb = _summary_writer()(str(local / "tb"), purge_step=first_step or None)
            self.bar = tqdm.tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                                 mininterval=2.0)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if time.monotonic() - self._pushed_at > self.push_every_s:
            self.push()
        if split == "train":
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                 acc=f"{row.get('bit_accuracy', float('nan')):.3f}", refresh=False)
        else:
            self.bar.write(f"step {step} {split}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                                if isinstance(v, float)))

    def push(self) -> None:
        """Publishes the files written so far (a no-op for a local workdir)."""
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()
            self.files.push()
            self._pushed_at = time.monotonic()

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def log(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
            self.files.push()


def _truncate_after(path: pathlib.Path, step: int) -> int:
    """Drops the rows of `path` logged after `step` (a resumed run recomputes them); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(lines) - len(keep)


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a line cut by a kill: dropped with the rows after it
        return float("inf")


def _plain(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.tolist() if v.ndim else v.item()
    return v


# ------------------------------------------------------------------------------------------------ learning curves
CURVE_KEYS = ("loss", "bit_accuracy")
_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def read_curves(path, keys=CURVE_KEYS) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of the "train" rows of a metrics.jsonl (local or gs://; a missing file or an
    unreadable line gives no points)."""
    out, path = {k: [] for k in keys}, storage.path(path)
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == "train":
            for k in keys:
                if isinstance(row.get(k), (int, float)):
                    out[k].append((int(row["step"]), float(row[k])))
    return out


def save_curves(runs: dict, out, keys=CURVE_KEYS, *, title: str = ""):
    """One PNG with a panel per metric (`keys`, train rows) and one line per run ({label: metrics.jsonl}), drawn
    with PIL: the learning curves of a training run or of an ablation sweep's runs. Returns `out` (local or gs://)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 -- only the plot needs it
    curves = {label: read_curves(path, keys) for label, path in runs.items()}
    w, h, pad = 420, 280, 48
    img = Image.new("RGB", (w * len(keys), h + 22 * len(runs) + 24), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), title, fill="black")
    for i, key in enumerate(keys):
        points = [p for c in curves.values() for p in c[key]]
        x0, y0, x1, y1 = i * w + pad, 24, (i + 1) * w - 12, h - pad + 24
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, y1 + 6), key, fill="black")
        if not points:
            continue
        (s_lo, s_hi), (v_lo, v_hi) = ((min(v), max(v)) for v in zip(*points))
        s_hi, v_hi = max(s_hi, s_lo + 1), v_hi if v_hi > v_lo else v_lo + 1e-6
        draw.text((x0 - pad + 4, y0), f"{v_hi:.4g}", fill="black")
        draw.text((x0 - pad + 4, y1 - 10), f"{v_lo:.4g}", fill="black")
        draw.text((x1 - 40, y1 + 6), f"step {s_hi}", fill="black")
        for j, c in enumerate(curves.values()):
            xy = [(x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (v - v_lo) / (v_hi - v_lo) * (y1 - y0))
                  for s, v in c[key]]
            if len(xy) > 1:
                draw.line(xy, fill=_COLORS[j % len(_COLORS)], width=2)
            elif xy:
                draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=_COLORS[j % len(_COLORS)])
    for j, label in enumerate(runs):
        draw.text((8, h + 28 + 22 * j), f"--- {label}", fill=_COLORS[j % len(_COLORS)])
    with storage.staged(out) as local:
        img.save(local, format="PNG")
    return storage.path(out)
