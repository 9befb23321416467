"""Evaluate a checkpoint on an editing benchmark in one command: edit every sample, score it by the benchmark's own
conventions, write the tables.

  python -m varedit_jax.evaluate --checkpoint CKPT --benchmark emu_edit|pie_bench|imgedit_bench|gedit|toy \
      --data DIR|gs://...|tfds:NAME@DATA_DIR --out DIR [--clip DIR] [--dino PATH] [--lpips PATH] \
      [--judge URL --judge-model NAME] [--resolution N] [--limit N] [--guidance G] [--tau T] [--seed S]
      [--image-tokenizer P] [--text-encoder P] [--preprocess official|train] [--batch-size N] [--language en|cn]

Data: the benchmark's local copy in its released layout (`data_pipelines.benchmarks`; EMU-Edit parquet, PIE-Bench
mapping_file.json + annotation_images, ImgEdit-Bench basic_edit.json + prompts.json + images, GEdit-Bench Arrow files,
a record dataset for toy - default: the checkpoint's eval_data), or a TFDS build of it (`tfds:emu_edit@DIR`).
Metric models come from disk (`--clip` a HF CLIP folder: ViT-B/32 for EMU-Edit, ViT-L/14 for PIE-Bench; `--dino` a
HF ViTModel folder or torch-hub file: dino-vits16 for EMU-Edit, dino-vitb8 for PIE-Bench; `--lpips` an lpips
squeeze state dict or folder); a metric whose model is not given is NaN. `--judge` is an OpenAI-compatible base URL
(key in $OPENAI_API_KEY): GPT-Suc. / GPT-Over. / GPT-Bal. for every benchmark, GEdit's SC / PQ / O and
ImgEdit-Bench's scores (`eval.suites`, `eval.bench_judges`).

Editing: `editor.Editor` over every device (the sampler's data axis), batches of --batch-size (default the
data-parallel size) samples; sample i (its position in the benchmark) draws from fold_in(seed, i), so outputs do not
depend on batching or on resuming.
Outputs in OUT: images/<name>.png (the output at the source's size; names as the benchmark's own scripts expect,
`benchmarks.output_name`), samples.jsonl (one row per sample: id, category, output, metrics, judge errors; while
running, each scored batch's rows go to samples.parts/),
results.{md,csv,json} (per category and overall, the paper's columns, s_per_edit), grid.png (the best and worst
samples), skipped.jsonl (samples the loader could not use), run.json (the settings).
Resuming: re-running the same command edits and scores only what is missing; outputs already written are re-scored
(not re-edited) when the metric models changed; other sampling settings for the same OUT are refused. --limit N
takes the first N samples. Exit codes: 0 done, 2 a usage / input error (one line).
"""
import argparse
import dataclasses
import itertools
import json
import math
import sys
import time

import jax
import numpy as np
import tqdm
from etils import epath

from data_pipelines import benchmarks
from varedit_jax import checkpoint, editor as editor_lib, images, loading, sampler, schedules, state_dicts
from varedit_jax.eval import judge as jd, report, suites

GRID = 4  # best and worst samples in grid.png
_ERRORS = (ValueError, FileNotFoundError, ImportError, state_dicts.StateDictMismatch, jd.JudgeSetupError,
           FloatingPointError)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What defines an evaluation in OUT (stored in run.json; all but `limit` and `batch_size` must match on resume)."""
    benchmark: str
    data: str
    guidance: float = sampler.DEFAULT_GUIDANCE
    tau: float = sampler.DEFAULT_TAU
    seed: int = 0
    resolution: int | None = None
    preprocess: str = "official"
    language: str | None = None
    limit: int | None = None
    batch_size: int | None = None

    def options(self) -> sampler.SamplingOptions:
        return sampler.SamplingOptions(guidance=self.guidance, tau=self.tau, seed=self.seed)

    def fixed(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("limit", "batch_size")}


def load_models(benchmark: str, *, clip=None, dino=None, lpips=None, judge_url=None, judge_model="gpt-4o",
                data=None, cache_dir=None) -> suites.MetricModels:
    """The metric models a benchmark uses, from the paths given (None: that metric is NaN)."""
    from varedit_jax.eval import clip as clip_lib, dino as dino_lib, lpips as lpips_lib, pie_metrics
    models = suites.MetricModels()
    if clip:
        models.clip = clip_lib.load_clip(clip)
    if dino:
        vit = dino_lib.load_dino(dino)
        models.dino = pie_metrics.StructureDistance(vit) if benchmark == "pie_bench" else dino_lib.ClsSimilarity(vit)
    if lpips:
        models.lpips = lpips_lib.load_lpips(lpips)
    if judge_url:
        models.judge = jd.Judge(jd.JudgeConfig(base_url=judge_url, model=judge_model, cache_dir=cache_dir))
        if benchmark == "imgedit_bench" and data and not str(data).startswith("tfds:"):
            models.imgedit_prompts = benchmarks.imgedit_prompts(data)
    return models


def scored_with(models: suites.MetricModels) -> list[str]:
    """The metric models a row was scored with (a row scored with others is re-scored on resume)."""
    return [name for name in ("clip", "dino", "lpips", "judge") if getattr(models, name) is not None]


# ------------------------------------------------------------------------------------------------- the state
def _plain(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _floats(row: dict) -> dict:
    return {k: (math.nan if v is None and k in suites.LABELS else v) for k, v in row.items()}


class Outputs:
    """OUT: run.json, samples.parts/<k>.jsonl (the rows of each scored chunk, written once: no appends, so gs://
    works; a later row of an id replaces an earlier one), samples.jsonl (all rows, written at the end), images/."""

    def __init__(self, out, settings: Settings, step: int | None, checkpoint_path: str):
        self.root = epath.Path(out)
        self.writer = jax.process_index() == 0
        self.run_path, self.parts = self.root / "run.json", self.root / "samples.parts"
        self.run = dict(settings=settings.fixed(), checkpoint=checkpoint_path, checkpoint_step=step, edit_calls=[])
        if self.run_path.exists():
            stored = json.loads(self.run_path.read_text())
            mine = dict(settings.fixed(), checkpoint_step=step)
            theirs = dict(stored["settings"], checkpoint_step=stored.get("checkpoint_step"))
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise ValueError(f"{self.root} holds an evaluation with other settings ({', '.join(diff)}: "
                                 f"{[theirs.get(k) for k in diff]} there, {[mine.get(k) for k in diff]} now): "
                                 "use another --out")
            self.run = stored
        self.rows: dict[str, dict] = {}
        self.num_parts = 0
        if self.parts.exists():
            for part in sorted(p for p in self.parts.iterdir() if p.name.endswith(".jsonl")):
                self.num_parts += 1
                for line in part.read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    self.rows[row["id"]] = _floats(row)
        self.existing = {row["output"] for row in self.rows.values()}  # outputs written (a row follows its PNG)
        if self.writer:
            self.parts.mkdir(parents=True, exist_ok=True)
            self.save_run()

    def _write(self, path: epath.Path, text: str) -> None:
        tmp = path.parent / f"{path.name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    def save_run(self) -> None:
        if self.writer:
            self._write(self.run_path, json.dumps(self.run, indent=1) + "\n")

    def write_image(self, name: str, image: np.ndarray) -> None:
        if self.writer:
            path = self.root / "images" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(images.png_bytes(image))

    def read_image(self, name: str) -> np.ndarray:
        return benchmarks.read_image(self.root / "images" / name)

    def add(self, rows: list[dict]) -> None:
        """Records a scored chunk's rows (one new part file)."""
        for row in rows:
            self.rows[row["id"]] = row
        if self.writer and rows:
            self._write(self.parts / f"{self.num_parts:06d}.jsonl", _jsonl(rows))
        self.num_parts += 1

    def write_samples(self, rows: list[dict]) -> None:
        if self.writer:
            self._write(self.root / "samples.jsonl", _jsonl(rows))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps({k: _plain(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------------- the loop
def _sample_row(benchmark: str, index: int, sample, models, metrics: dict) -> dict:
    category = benchmarks.IMGEDIT_TYPES.get(sample.category, sample.category) if benchmark == "imgedit_bench" \
        else sample.category
    row = dict(id=sample.id, index=index, category=category or "all", instruction=sample.instruction,
               output=benchmarks.output_name(sample.id), scored_with=scored_with(models))
    if benchmark == "gedit":
        row.update(language=sample.extra.get("language", ""), intersection=sample.extra.get("intersection_exist"))
    return {**row, **metrics}


class Evaluation:
    """One benchmark run of one checkpoint into OUT (see the module docstring)."""

    def __init__(self, checkpoint_path, out, settings: Settings, models: suites.MetricModels, *,
                 image_tokenizer: str | None = None, text_encoder: str | None = None):
        if settings.benchmark not in suites.BENCHMARKS:
            raise ValueError(f"unknown benchmark {settings.benchmark!r}; choose from {', '.join(suites.BENCHMARKS)}")
        self.checkpoint_path, self.settings, self.models = str(checkpoint_path), settings, models
        self.tokenizer_path, self.text_path = image_tokenizer, text_encoder
        self.out = Outputs(out, settings, _step(checkpoint_path), self.checkpoint_path)
        self._editor, self._edited = None, False
        self.skips = benchmarks.Skips()

    def editor(self) -> editor_lib.Editor:
        if self._editor is None:
            self._editor = editor_lib.Editor.from_checkpoint(self.checkpoint_path, self.tokenizer_path,
                                                             self.text_path, batch_size=self.settings.batch_size)
        return self._editor

    def samples(self):
        s = self.settings
        if s.benchmark == "gedit" and s.language and not s.data.startswith("tfds:"):
            loader = benchmarks.gedit_bench(s.data, language=s.language, skips=self.skips)
        else:
            loader = benchmarks.load(s.benchmark, s.data, self.skips)
        return itertools.islice(enumerate(loader), s.limit)

    def _edit(self, chunk: list) -> list[np.ndarray]:
        """Outputs of (index, sample) pairs, edited in one call, written as PNGs; the call is timed."""
        edit = self.editor()
        t0 = time.perf_counter()
        outputs = edit.edit([s.source for _, s in chunk], [s.instruction for _, s in chunk],
                            self.settings.options(), resolution=self.settings.resolution,
                            preprocess=self.settings.preprocess, indices=[i for i, _ in chunk])
        self.out.run["edit_calls"].append([len(chunk), time.perf_counter() - t0, not self._edited])
        self._edited = True
        outputs = [suites.match_size(o, s.source) for o, (_, s) in zip(outputs, chunk)]
        for (_, sample), output in zip(chunk, outputs):
            self.out.write_image(benchmarks.output_name(sample.id), output)
        return outputs

    def _process(self, chunk: list) -> None:
        to_edit = [(i, s) for i, s in chunk if benchmarks.output_name(s.id) not in self.out.existing]
        edited = dict(zip((s.id for _, s in to_edit), self._edit(to_edit))) if to_edit else {}
        outputs = [edited[s.id] if s.id in edited else self.out.read_image(benchmarks.output_name(s.id))
                   for _, s in chunk]
        metrics = suites.score(self.settings.benchmark, [s for _, s in chunk], outputs, self.models) \
            if jax.process_index() == 0 else [{}] * len(chunk)
        self.out.add([_sample_row(self.settings.benchmark, i, s, self.models, m)
                      for (i, s), m in zip(chunk, metrics)])
        self.out.save_run()

    def run(self, progress: bool = True) -> list[dict]:
        """Edits and scores what is missing, writes the tables and the grid; returns the table rows."""
        want = scored_with(self.models)
        chunk_size = self.settings.batch_size or jax.device_count()
        ids, pending = [], []
        bar = tqdm.tqdm(total=self.settings.limit, unit="sample", dynamic_ncols=True, disable=not progress,
                        desc=self.settings.benchmark)
        for index, sample in self.samples():
            ids.append(sample.id)
            done = self.out.rows.get(sample.id)
            if done is not None and done.get("scored_with") == want:
                bar.update(1)
                continue
            pending.append((index, sample))
            if len(pending) == chunk_size:
                self._process(pending)
                bar.update(len(pending))
                pending = []
        if pending:
            self._process(pending)
            bar.update(len(pending))
        bar.close()
        return self.write_results([self.out.rows[i] for i in ids])

    def s_per_edit(self) -> float | None:
        """Seconds per edit over the timed calls [n, seconds, first of its process], leaving out each process's
        first call (compilation) when there are others."""
        calls = self.out.run["edit_calls"]
        timed = [c for c in calls if not c[2]] or calls
        n = sum(c[0] for c in timed)
        return sum(c[1] for c in timed) / n if n else None

    def write_results(self, rows: list[dict]) -> list[dict]:
        s, root = self.settings, self.out.root
        table = suites.table_rows(s.benchmark, rows, s_per_edit=self.s_per_edit()) if rows else []
        if jax.process_index() != 0:
            return table
        judge = f", judge {self.models.judge.config.model}" if self.models.judge else ""
        title = (f"{s.benchmark}: {self.checkpoint_path} (step {self.out.run.get('checkpoint_step')}), "
                 f"{len(rows)} samples, guidance {s.guidance}, tau {s.tau}, seed {s.seed}{judge}")
        report.write_table(table, root, "results", columns=suites.columns(s.benchmark), title=title)
        self.out.write_samples(rows)
        (root / "skipped.jsonl").write_text("".join(json.dumps(dict(id=i, reason=r, detail=d)) + "\n"
                                                    for i, r, d in self.skips.rows))
        self.write_grid(rows)
        return table

    def write_grid(self, rows: list[dict]) -> None:
        key = suites.rank_key(self.settings.benchmark, rows)
        ranked = sorted((r for r in rows if key and math.isfinite(r.get(key, math.nan))), key=lambda r: -r[key])
        if not ranked:
            ranked, key = rows, None
        k = min(GRID, len(ranked) // 2) or len(ranked)
        chosen = ranked[:k] + (ranked[-k:] if len(ranked) > k else [])
        if not chosen:
            return
        wanted = {r["id"]: n for n, r in enumerate(chosen)}
        found = {}
        for _, sample in self.samples():  # the sources of the chosen samples (stops once all are found)
            if sample.id in wanted:
                found[sample.id] = sample
                if len(found) == len(wanted):
                    break
        chosen = [r for r in chosen if r["id"] in found]
        labels = [f"[{'best' if n < k else 'worst'}{f' {suites.LABELS[key]} {r[key]:.3f}' if key else ''}] "
                  f"{r['instruction']}" for n, r in enumerate(chosen)]
        targets = [found[r["id"]].target for r in chosen]
        report.save_grid(self.out.root / "grid.png", [found[r["id"]].source for r in chosen], labels,
                         [self.out.read_image(r["output"]) for r in chosen],
                         targets=targets if all(t is not None for t in targets) else None,
                         title=f"{self.settings.benchmark}: best / worst by {suites.LABELS.get(key, 'order')}")


def _step(path) -> int | None:
    """The step of an orbax checkpoint path (None for official weights)."""
    if loading.is_weights(epath.Path(path)):
        return None
    return checkpoint.resolve(path)[1]


# ------------------------------------------------------------------------------------------------------ CLI
def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The benchmark and metric-model flags (shared with `ablate --benchmark`)."""
    p.add_argument("--data", help="the benchmark's local copy, gs://..., or tfds:NAME@DATA_DIR (toy: default the "
                   "checkpoint's eval_data)")
    p.add_argument("--clip", help="Hugging Face CLIP folder (ViT-B/32 for EMU-Edit, ViT-L/14 for PIE-Bench)")
    p.add_argument("--dino", help="DINO: HF ViTModel folder or torch-hub state dict (vits16 EMU-Edit, vitb8 PIE)")
    p.add_argument("--lpips", help="LPIPS-squeeze: an lpips.LPIPS(net='squeeze') state dict, or a folder with "
                   "squeezenet1_1*.pth + squeeze.pth")
    p.add_argument("--judge", help="OpenAI-compatible base URL of the judge (key in $OPENAI_API_KEY)")
    p.add_argument("--judge-model", default="gpt-4o", help="judge model name (default gpt-4o; GEdit uses gpt-4.1)")
    p.add_argument("--language", choices=("en", "cn"), help="GEdit-Bench: one instruction language (default both)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--resolution", type=int, choices=sorted(schedules.RESOLUTION_TO_PN),
                   help="size class (default: the checkpoint's own)")
    p.add_argument("--preprocess", choices=editor_lib.PREPROCESS, default="official")
    p.add_argument("--batch-size", type=int, help="samples per edit call (default: the data-parallel size)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m varedit_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="transformer checkpoint / workdir / official weights")
    p.add_argument("--benchmark", required=True, choices=suites.BENCHMARKS)
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--image-tokenizer", help="overrides the checkpoint config's image_tokenizer.path")
    p.add_argument("--text-encoder", help="overrides the checkpoint config's text.path")
    p.add_argument("--guidance", type=float, default=sampler.DEFAULT_GUIDANCE)
    p.add_argument("--tau", type=float, default=sampler.DEFAULT_TAU)
    p.add_argument("--seed", type=int, default=0)
    add_model_flags(p)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1 or args.batch_size is not None and args.batch_size < 1:
        p.error("--limit and --batch-size must be >= 1")
    if args.judge and not args.judge.startswith(("http://", "https://")):
        p.error("--judge must be an http:// or https:// URL")
    if args.benchmark in ("gedit", "imgedit_bench") and not args.judge:
        print(f"warning: {args.benchmark} is scored by a judge (--judge URL); without one only the outputs are "
              "written", file=sys.stderr)
    try:
        data = args.data or default_data(args.benchmark, args.checkpoint)
        settings = Settings(args.benchmark, data, args.guidance, args.tau, args.seed, args.resolution,
                            args.preprocess, args.language, args.limit, args.batch_size)
        models = load_models(args.benchmark, clip=args.clip, dino=args.dino, lpips=args.lpips,
                             judge_url=args.judge, judge_model=args.judge_model, data=data,
                             cache_dir=str(epath.Path(args.out) / "judge_cache"))
        evaluation = Evaluation(args.checkpoint, args.out, settings, models, image_tokenizer=args.image_tokenizer,
                                text_encoder=args.text_encoder)
        table = evaluation.run()
    except _ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(report.markdown_table(table, suites.columns(args.benchmark)))
        print(f"skipped: {evaluation.skips.summary()}\nresults: {epath.Path(args.out) / 'results.md'} "
              f"(.csv, .json), samples.jsonl, grid.png, images/")
    return 0


def default_data(benchmark: str, checkpoint_path) -> str:
    """--data when it is not given: the toy checkpoint's eval_data (other benchmarks need --data)."""
    if benchmark != "toy":
        raise ValueError(f"--benchmark {benchmark} needs --data (the benchmark's local copy)")
    paths = list(checkpoint.load_config(checkpoint_path).eval_data.paths)
    if not paths:
        raise ValueError(f"{checkpoint_path}: its config names no eval_data.paths; pass --data")
    return ",".join(paths)


if __name__ == "__main__":
    sys.exit(main())
