"""Editing evaluation: exact toy metrics, benchmark loaders, CLIP / PIE-Bench metrics, the GPT-Balance judge, reports.

Nothing here downloads anything: models load from files the user supplies. The package imports none of its modules;
import the ones you need.

Modules
  images       image conventions: uint8 [0, 255] or float [-1, 1], HWC / NHWC; masks 1 = edited pixel
  scores       balance (harmonic mean, 0 if either score is 0) and summarize (mean of per-sample balances + the
               balance of the means, undefined samples counted)
  toy_metrics  exact toy-task success / preservation / balance (0-10) and the copy-source / oracle reference rows
  (the benchmark loaders -> Sample live in `data_pipelines.benchmarks`: EMU-Edit, PIE-Bench, ImgEdit-Bench, GEdit-Bench)
  vit          the pre-norm transformer encoder and ViT shared by CLIP and DINO (Flax NNX)
  clip_tokenizer, clip   CLIP from a Hugging Face folder; CLIP-Out / CLIP-Dir / CLIP-I (EMU-Edit), CLIP-Whole /
               CLIP-Edit (PIE-Bench)
  dino, lpips, pie_metrics   DINO (HF ViTModel folders or torch-hub files; EMU-Edit CLS similarity, PIE-Bench
               structure distance) and unedited-region PSNR / MSE / SSIM / LPIPS-squeeze (the lpips package's layout)
  judge        GPT-Suc. / GPT-Over. / GPT-Bal. with any OpenAI-compatible endpoint (prompt of the paper's Figure 9)
  bench_judges GEdit-Bench SC / PQ / O and ImgEdit-Bench per-type scores through the same judge
  suites       each benchmark's per-sample metrics and result table (what `python -m varedit_jax.evaluate` runs)
  report       Markdown + CSV + JSON tables, image grids (source | [target] | output + instruction)
Verified against the reference libraries on tiny random weights: CLIP vs transformers.CLIPModel, DINO vs
transformers.ViTModel, LPIPS vs lpips.LPIPS (its real linear heads), SSIM / PSNR / MSE vs torchmetrics; numbers with
the real released weights are not reproduced here (no weights can be fetched).

What an ablation sweep calls (per strategy; batches as `varedit_jax.data` yields them, outputs from the sampler):
  from varedit_jax.eval import report, toy_metrics
  per_batch = [toy_metrics.toy_scores(b["source"], b["target"], outputs, b["mask"], has_mask=b["has_mask"])
               for b, outputs in ...]                     # dict of (B,) arrays: success, preservation, balance, ...
  row = toy_metrics.summarize_toy(toy_metrics.concat(per_batch))
        # {success, preservation, balance (reported: mean of per-sample), balance_of_means, n, n_undefined,
        #  mae_edit, mae_keep}
  refs = toy_metrics.reference_scores(source, target, mask, reconstruct=tokenizer_roundtrip, has_mask=has_mask)
        # {"copy_source": per-sample, "oracle": per-sample}; summarize each the same way
  report.write_table(rows, workdir, "results", title=...)        # results.md / .csv / .json
  report.save_grid(workdir / "grids" / f"{strategy}.png", sources, instructions, outputs, targets=targets)
Benchmarks: `python -m varedit_jax.evaluate` (`evaluate.Evaluation`), or by hand:
`data_pipelines.benchmarks.load(name, root, skips)`; `clip.load_clip(folder)` + `clip.emu_edit_metrics` /
`clip.pie_bench_metrics`; `pie_metrics.evaluate(...)` with `pie_metrics.StructureDistance(dino.load_dino(path))` and
`lpips.load_lpips(path)`; `suites.score(benchmark, samples, outputs, suites.MetricModels(...))`;
`judge.Judge(judge.JudgeConfig(base_url=..., model=..., cache_dir=...)).judge(items)` + `judge.summarize_judge`.
"""
