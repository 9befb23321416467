"""Source-image conditioning: the sequence layout of every mode, and SAR's pooling of the source keys/values.

ONE mechanism, selected by the top-level config field `conditioning`; the model modules are shared by all modes
(none of them adds parameters):

  none    plain Infinity: [SOS | target scales 1..K-1]; block-causal over scales.
  finest  official VAREdit without SAR: [source (h_K x w_K) | SOS | targets]. Source tokens get lvl_embed[K-1] and
          the official RoPE positions (`rope.official_positions`, folded raster below 1M). Every block: the source
          attends to the source only; target scale k attends to all source tokens and to target scales <= k.
  sar     official VAREdit (Scale-Aligned Reference): as `finest`, except block 0, where target scale k attends to
          the block-0 source keys/values area-pooled to (h_k, w_k) (after normalisation and RoPE, no
          renormalisation; identity at the last scale) instead of the full source, plus target scales <= k.
  full    the paper's all-scale baseline (the official code only has remnants of it): source scale k =
          area_resize(source, (h_k, w_k)) for every target scale k, laid out [source scales 0..K-1 | SOS | targets],
          source scale k with lvl_embed[k] and RoPE = the target star grid of scale k offset by the source offset
          (uph, upw) of the template's 1M grid; targets use Infinity's (unfolded) star positions. Mask = the official
          remnant `var_edit_block` rule: a source token of scale j sees source scales <= j; a target token of scale k
          sees source scales <= k and target scales <= k. The same mask in every block.

The source is the tokenizer's continuous encoder output (float32, never quantised), as a grid (B, h_K, w_K, d) in
the transformer's token space, embedded with the same `word_embed` as the targets. Input lengths at 256 px
(schedule 1..16): full 1042, finest 777, sar 777.

`sequence_layout` returns everything static about one (conditioning, schedule, template): segment ids, level index
per token, RoPE positions, the `SegmentMask` of block 0 and of blocks >= 1, and SAR's pooling plan. Block 0's keys
and values are laid out as [pooled source segments | sequence] (the pooled segments are empty unless `sar`), so
SAR's block 0 is one block-masked attention. The sequence itself is [source segments | target scales].
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from varedit_jax import resample, rope, schedules
from varedit_jax.attention import SegmentMask

MODES = ("none", "full", "finest", "sar")
EDITING_MODES = ("full", "finest", "sar")  # the paper's Table 3 ablation


def parse(arg: str | None) -> str:
    """An editing conditioning (full / finest / sar) from a config argument; None or "" give the official `sar`."""
    mode = arg or "sar"
    if mode not in EDITING_MODES:
        raise ValueError(f"conditioning must be one of {', '.join(EDITING_MODES)}; got {mode!r}")
    return mode


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Static description of one sequence (all arrays numpy). Build with `sequence_layout` (cached).

    conditioning: one of MODES.
    schedule: target scales ((h, w), ...); template: aspect template key.
    source_grid: (h_K, w_K) of the source input, None without a source.
    source_scales: (h, w) of each source segment in sequence order (() / (final,) / the whole schedule).
    segment: (L,) int32 segment id per token: sources 0..S-1, target scale k = S + k.
    level: (L,) int32 lvl_embed index per token.
    positions: (L, 2) int32 RoPE grid positions.
    mask: SegmentMask over (segment, segment) for blocks >= 1.
    first_mask: SegmentMask over (segment, first_kv_segment) for block 0.
    first_kv_segment: (P + L,) segment ids of block 0's keys = [pooled segments | sequence].
    pool_sizes: (h, w) of each pooled segment, in order (SAR only; segments S + K, S + K + 1, ...).
    """
    conditioning: str
    schedule: schedules.Schedule
    template: str
    source_grid: tuple[int, int] | None
    source_scales: tuple[tuple[int, int], ...]
    segment: np.ndarray
    level: np.ndarray
    positions: np.ndarray
    mask: SegmentMask
    first_mask: SegmentMask
    first_kv_segment: np.ndarray
    pool_sizes: tuple[tuple[int, int], ...]

    @property
    def n_source(self) -> int:
        return int(sum(h * w for h, w in self.source_scales))

    @property
    def n_target(self) -> int:
        return schedules.num_tokens(self.schedule)

    @property
    def length(self) -> int:
        return self.n_source + self.n_target

    @property
    def n_pooled(self) -> int:
        return int(sum(h * w for h, w in self.pool_sizes))

    def target_slice(self, k: int) -> slice:
        """Sequence rows of target scale k (k = 0 is the SOS)."""
        offsets = schedules.scale_offsets(self.schedule)
        return slice(self.n_source + int(offsets[k]), self.n_source + int(offsets[k + 1]))

    @property
    def source_slice(self) -> slice:
        return slice(0, self.n_source)


def infer_template(schedule) -> str:
    """The unique template whose 1M schedule starts with `schedule`; raises if none or several do."""
    schedule = tuple(tuple(s) for s in schedule)
    found = [t for t in schedules.TEMPLATES if schedules.full_schedule(t)[:len(schedule)] == schedule]
    if len(found) != 1:
        raise ValueError(f"schedule {schedule} matches templates {found}; pass the aspect template explicitly")
    return found[0]


def _block_causal(levels_q: np.ndarray, levels_k: np.ndarray) -> np.ndarray:
    return levels_q[:, None] >= levels_k[None, :]


def sequence_layout(conditioning: str, schedule, template: float | str | None = None) -> SequenceLayout:
    """The layout of `schedule` ((h, w) rows; the last grid is the source grid) under `conditioning`; one cached
    object per (conditioning, schedule, template), so it can be a static jit argument."""
    if conditioning not in MODES:
        raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {MODES}")
    schedule = tuple((int(h), int(w)) for h, w in schedule)
    template = schedules.template_key(template) if template is not None else infer_template(schedule)
    return _sequence_layout(conditioning, schedule, template)


@functools.lru_cache(maxsize=None)
def _sequence_layout(conditioning: str, schedule: schedules.Schedule, template: str) -> SequenceLayout:
    k_scales = len(schedule)
    final = schedule[-1]
    targets = np.arange(k_scales)

    if conditioning == "none":
        source_scales, source_levels = (), np.zeros(0, np.int64)
        positions = rope.official_positions(template, schedule, source=False)
    elif conditioning in ("finest", "sar"):
        source_scales, source_levels = (final,), np.array([k_scales - 1])
        positions = rope.official_positions(template, schedule, source=True)
    else:  # full
        source_scales, source_levels = schedule, targets
        offset = np.array(rope.final_grid(template), np.int32)
        tgt = rope.target_positions(template, schedule)
        positions = np.concatenate([tgt + offset, tgt])
    n_src_seg = len(source_scales)

    sizes = [h * w for h, w in source_scales] + [h * w for h, w in schedule]
    segment = np.repeat(np.arange(n_src_seg + k_scales), sizes).astype(np.int32)
    level = np.repeat(np.concatenate([source_levels, targets]), sizes).astype(np.int32)

    # table[q_seg, kv_seg] over [source segments | target scales]
    n_seg = n_src_seg + k_scales
    table = np.zeros((n_seg, n_seg), bool)
    if conditioning == "full":
        table[:k_scales, :k_scales] = _block_causal(targets, targets)
        table[k_scales:, :k_scales] = _block_causal(targets, targets)
    elif n_src_seg:
        table[0, 0] = True
        table[1:, 0] = True
    table[n_src_seg:, n_src_seg:] = _block_causal(targets, targets)
    mask = SegmentMask(segment, segment, table)

    pool_sizes: tuple[tuple[int, int], ...] = ()
    first_kv_segment, first_table = segment, table
    if conditioning == "sar":
        pooled_scales = [k for k in range(k_scales) if schedule[k] != final]
        pool_sizes = tuple(schedule[k] for k in pooled_scales)
        first_table = np.zeros((n_seg, n_seg + len(pooled_scales)), bool)
        first_table[:, :n_seg] = table
        first_table[n_src_seg:, 0] = False
        for k in range(k_scales):
            if k in pooled_scales:
                first_table[n_src_seg + k, n_seg + pooled_scales.index(k)] = True
            else:  # area pooling to the source's own size is the identity: see the source itself
                first_table[n_src_seg + k, 0] = True
        pooled_segment = np.repeat(np.arange(n_seg, n_seg + len(pooled_scales)),
                                   [h * w for h, w in pool_sizes]).astype(np.int32)
        first_kv_segment = np.concatenate([pooled_segment, segment])
    first_mask = SegmentMask(segment, first_kv_segment, first_table)

    positions = positions.astype(np.int32)
    for a in (segment, level, positions, first_kv_segment, table, first_table):
        a.setflags(write=False)
    return SequenceLayout(conditioning=conditioning, schedule=schedule, template=template,
                          source_grid=final if n_src_seg else None, source_scales=tuple(source_scales),
                          segment=segment, level=level, positions=positions, mask=mask,
                          first_mask=first_mask, first_kv_segment=first_kv_segment, pool_sizes=pool_sizes)


def source_segments(layout: SequenceLayout, source: jax.Array) -> jax.Array:
    """The source segments (B, n_source, d) from the source grid (B, h_K, w_K, d): the grid itself (finest, sar)
    or its area resizes to every scale (full); float32."""
    if layout.source_grid is None:
        raise ValueError(f"conditioning {layout.conditioning!r} takes no source")
    if source is None:
        raise ValueError(f"conditioning {layout.conditioning!r} needs the source grid (B, h_K, w_K, d)")
    if tuple(source.shape[1:3]) != layout.source_grid:
        raise ValueError(f"source grid {tuple(source.shape[1:3])} != the schedule's last scale {layout.source_grid}")
    source = source.astype(jnp.float32)
    b, d = source.shape[0], source.shape[-1]
    return jnp.concatenate([resample.area_resize(source, s).reshape(b, -1, d) for s in layout.source_scales], 1)


def pool_source(layout: SequenceLayout, x: jax.Array) -> jax.Array:
    """SAR: area-pools the source rows of x (B, n_source, N, D) to every pooled size -> (B, n_pooled, N, D).

    Applied to block 0's keys (after normalisation and RoPE) and values; no renormalisation. Pooling runs in
    float32 and returns x's dtype.
    """
    b, n, heads, dim = x.shape
    h, w = layout.source_grid
    grid = x.astype(jnp.float32).reshape(b, h, w, heads * dim)
    pooled = [resample.area_resize(grid, s).reshape(b, s[0] * s[1], heads, dim) for s in layout.pool_sizes]
    return jnp.concatenate(pooled, 1).astype(x.dtype)
