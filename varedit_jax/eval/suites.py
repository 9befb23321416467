"""Each benchmark's metrics by its own conventions, and its result table (what `python -m varedit_jax.evaluate` scores).

Inputs: `data_pipelines.benchmarks.Sample`s and their outputs as uint8 (H, W, 3) at the source's size.
Per-sample metrics (NaN where the metric's model is not given or the value is undefined):
  emu_edit       clip_i, clip_out, clip_dir (CLIP ViT-B/32, `clip.emu_edit_metrics`: raw cosines), dino (cosine of
                 DINO CLS features, `dino.ClsSimilarity`), l1 (mean |output - source| on [0, 1] pixels: MagicBrush's
                 nn.L1Loss on ToTensor images, the output resized to the source first)
  pie_bench      structure_distance, psnr, lpips, mse, ssim (`pie_metrics`), clip_whole, clip_edit (CLIP ViT-L/14
                 CLIPScore / 100: the scale of the paper's Table 1, e.g. 0.266, where PnPInversion prints x100)
  gedit          sc, pq, o (judge, `bench_judges`)
  imgedit_bench  score (judge, the edit type's prompt from the benchmark's prompts.json; 1-5)
  toy            success, preservation, balance (exact, `toy_metrics`; 0-10)
  every benchmark, with a judge: gpt_success, gpt_overedit, gpt_balance (`judge`, the paper's Figure 9 prompt)
Tables (`table_rows`): one row per category, then the overall row(s); every value is the mean over the samples where it
is defined (PIE-Bench's nan-aware means), GPT-Bal. the mean of per-sample harmonic means. Overall rows: emu_edit,
pie_bench, toy: over all samples; imgedit_bench: the mean over edit types (the leaderboard's Overall); gedit: the mean
over task groups, per language, for the full set and the Intersection subset (GEdit's `calculate_statistics.py`).
Columns are the paper's names (`LABELS`).
"""
import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from varedit_jax import images as imgs
from varedit_jax.eval import bench_judges, judge as jd, pie_metrics, scores, toy_metrics

BENCHMARKS = ("emu_edit", "pie_bench", "imgedit_bench", "gedit", "toy")
METRICS = {"emu_edit": ("clip_i", "clip_out", "clip_dir", "dino", "l1"),
           "pie_bench": ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edit"),
           "gedit": ("sc", "pq", "o"), "imgedit_bench": ("score",), "toy": ("success", "preservation", "balance")}
GPT = ("gpt_success", "gpt_overedit", "gpt_balance")
# The metric each benchmark's best / worst grid ranks by when no judge is given (higher is better).
RANK_BY = {"emu_edit": "clip_dir", "pie_bench": "clip_edit", "gedit": "o", "imgedit_bench": "score", "toy": "balance"}
LABELS = {"clip_i": "CLIP-I", "clip_out": "CLIP-Out", "clip_dir": "CLIP-Dir", "dino": "DINO", "l1": "L1",
          "structure_distance": "Structure", "psnr": "PSNR", "lpips": "LPIPS", "mse": "MSE", "ssim": "SSIM",
          "clip_whole": "CLIP-Whole", "clip_edit": "CLIP-Edit", "sc": "G_SC", "pq": "G_PQ", "o": "G_O",
          "score": "Score", "success": "Success", "preservation": "Preservation", "balance": "Balance",
          "gpt_success": "GPT-Suc.", "gpt_overedit": "GPT-Over.", "gpt_balance": "GPT-Bal."}


@dataclasses.dataclass
class MetricModels:
    """The loaded metric models (None: not given). dino: `dino.ClsSimilarity` (emu_edit) or
    `pie_metrics.StructureDistance` (pie_bench); lpips: `lpips.LpipsMetric`; imgedit_prompts: {edit_type: text}."""
    clip: object = None
    dino: object = None
    lpips: object = None
    judge: jd.Judge | None = None
    imgedit_prompts: dict | None = None


def match_size(output: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The output resized to the source's (H, W) (PIL bicubic) when they differ: benchmarks compare at that size."""
    if output.shape[:2] == source.shape[:2]:
        return output
    return np.asarray(Image.fromarray(output).resize((source.shape[1], source.shape[0]), Image.Resampling.BICUBIC))


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def _emu(samples, outputs, models) -> dict[str, np.ndarray]:
    n, sources = len(samples), [s.source for s in samples]
    out = dict(clip_i=_nan(n), clip_out=_nan(n), clip_dir=_nan(n), dino=_nan(n))
    if models.clip is not None:
        from varedit_jax.eval import clip as clip_lib
        out.update(clip_lib.emu_edit_metrics(models.clip, sources, outputs, [s.source_caption for s in samples],
                                             [s.target_caption for s in samples]))
    if models.dino is not None:
        out["dino"] = models.dino(sources, outputs)
    out["l1"] = np.array([np.abs(imgs.to_unit(o) - imgs.to_unit(s)).mean() for s, o in zip(sources, outputs)])
    return out


def _pie(samples, outputs, models) -> dict[str, np.ndarray]:
    rows = pie_metrics.evaluate([s.source for s in samples], outputs, [s.mask for s in samples],
                                structure=models.dino, lpips=models.lpips, clip=models.clip,
                                edit_prompts=[s.target_caption for s in samples])
    out = {k: np.array([r[k] for r in rows], np.float64) for k in METRICS["pie_bench"]}
    out["clip_whole"], out["clip_edit"] = out["clip_whole"] / 100.0, out["clip_edit"] / 100.0
    return out


def _toy(samples, outputs, models) -> dict[str, np.ndarray]:
    if any(s.target is None for s in samples):
        raise ValueError("the toy metrics need record samples with targets")
    masks = [s.mask if s.mask is not None else np.zeros(s.source.shape[:2], np.uint8) for s in samples]
    return toy_metrics.toy_scores(np.stack([s.source for s in samples]), np.stack([s.target for s in samples]),
                                  np.stack(outputs), np.stack(masks), has_mask=[s.mask is not None for s in samples])


def _judged(benchmark, samples, outputs, models, rows) -> None:
    """Adds the GPT scores (and GEdit's / ImgEdit's) to `rows` in place; failures are recorded as `judge_error`."""
    items = [jd.JudgeItem(s.id, s.source, o, s.instruction) for s, o in zip(samples, outputs)]
    for row, result, sample, output in zip(rows, models.judge.judge(items), samples, outputs):
        row.update(gpt_success=result.success, gpt_overedit=result.overedit, gpt_balance=result.balance)
        errors = [result.error] if result.error else []
        if benchmark == "gedit":
            pq, error = bench_judges.gedit_pq(models.judge, sample.id, output)
            row.update(bench_judges.gedit_scores(result.success, result.overedit, pq))
            errors += [f"pq: {error}"] if error else []
        elif benchmark == "imgedit_bench" and models.imgedit_prompts is not None:
            template = models.imgedit_prompts.get(sample.category)
            if template is None:
                errors.append(f"prompts.json has no prompt for edit type {sample.category!r}")
            else:
                row["score"], error = bench_judges.imgedit_score(models.judge, sample.id, sample.source, output,
                                                                 sample.instruction, template)
                errors += [f"score: {error}"] if error else []
        if errors:
            row["judge_error"] = "; ".join(errors)


def score(benchmark: str, samples: Sequence, outputs: Sequence[np.ndarray], models: MetricModels) -> list[dict]:
    """Per-sample metric dicts (the module docstring's keys, plain floats) of `outputs` (uint8, any size: resized to
    each source's size first)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    outputs = [match_size(imgs.to_uint8(o), s.source) for s, o in zip(samples, outputs)]
    n = len(samples)
    per = {"emu_edit": _emu, "pie_bench": _pie, "toy": _toy}.get(benchmark)
    columns = per(samples, outputs, models) if per else {k: _nan(n) for k in METRICS[benchmark]}
    rows = [{k: float(columns[k][i]) for k in METRICS[benchmark]} for i in range(n)]
    for row in rows:
        row.update(dict.fromkeys(GPT, math.nan))
    if models.judge is not None:
        _judged(benchmark, samples, outputs, models, rows)
    return rows


# ------------------------------------------------------------------------------------------------------- tables
def _means(rows: Sequence[dict], keys: Sequence[str]) -> dict:
    return {k: scores.nanmean([r.get(k, math.nan) for r in rows])[0] for k in keys}


def _row(category: str, rows: Sequence[dict], keys: Sequence[str], **extra) -> dict:
    return {"category": category, "n": len(rows), **{LABELS[k]: v for k, v in _means(rows, keys).items()}, **extra}


def _group_mean(category: str, rows: Sequence[dict], keys: Sequence[str], group: str = "category") -> dict:
    """The mean over groups of the group means (ImgEdit's Overall, GEdit's per-language score)."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r[group], []).append(r)
    per = [_means(g, keys) for g in groups.values()]
    return {"category": category, "n": len(rows),
            **{LABELS[k]: scores.nanmean([p[k] for p in per])[0] for k in keys}}


def table_rows(benchmark: str, rows: Sequence[dict], *, s_per_edit: float | None = None) -> list[dict]:
    """The result table of per-sample rows (each with "category" and the metric keys; gedit rows also "language"
    and "intersection"): per category, then the overall row(s) (module docstring)."""
    keys = METRICS[benchmark] + GPT
    extra = {} if s_per_edit is None else {"s_per_edit": s_per_edit}
    if benchmark == "gedit":
        out = []
        for lang in dict.fromkeys(r["language"] for r in rows):
            mine = [r for r in rows if r["language"] == lang]
            out += [_row(f"{c}/{lang}", [r for r in mine if r["category"] == c], keys)
                    for c in dict.fromkeys(r["category"] for r in mine)]
            out.append({**_group_mean(f"overall/{lang}", mine, keys), **extra})
            inter = [r for r in mine if r.get("intersection")]
            if inter:
                out.append(_group_mean(f"intersection/{lang}", inter, keys))
        return out
    cats = list(dict.fromkeys(r["category"] for r in rows))
    out = [_row(c, [r for r in rows if r["category"] == c], keys) for c in cats]
    overall = _group_mean("overall", rows, keys) if benchmark == "imgedit_bench" else _row("overall", rows, keys)
    return out + [{**overall, **extra}]


def columns(benchmark: str, with_time: bool = True) -> list[str]:
    return ["category", "n"] + [LABELS[k] for k in METRICS[benchmark] + GPT] + (["s_per_edit"] if with_time else [])


def rank_key(benchmark: str, rows: Sequence[dict]) -> str | None:
    """The per-sample metric the best / worst grid ranks by: GPT-Bal. when judged, else the benchmark's own (None
    when no sample has a finite value of either)."""
    for key in ("gpt_balance", RANK_BY[benchmark]):
        if any(math.isfinite(r.get(key, math.nan)) for r in rows):
            return key
    return None
