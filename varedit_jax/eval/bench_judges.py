"""The judge protocols of GEdit-Bench and ImgEdit-Bench, over `judge.Judge` (same endpoint, cache and retries).

GEdit-Bench (Step1X-Edit `GEdit-Bench`, VIEScore): semantic consistency SC = min(score1, score2) of the two-image
  editing rule - the same request as GPT-Suc. / GPT-Over. (the paper's Figure 9 prompt is VIEScore's SC rule), so
  SC = min(GPT-Suc., GPT-Over.); perceptual quality PQ = min(naturalness, artifacts) of `PQ_PROMPT` on the edited
  image alone (0-10 each); overall O = sqrt(SC * PQ). `PQ_PROMPT` is our wording of VIEScore's PQ rubric (its own
  text is not shipped here): scores are comparable between runs of this code with one judge, not digit-for-digit with
  the GEdit leaderboard (which also uses GPT-4.1: pass `--judge-model gpt-4.1`).
ImgEdit-Bench (PKU-YuanGroup/ImgEdit `Benchmark/Basic`): the benchmark's own prompt for the sample's edit type (its
  `prompts.json`, `<edit_prompt>` replaced by the instruction), then the source and the edited image; the reply's
  lines `<Name>: <digits>` (1-5) are averaged and rounded to 2 decimals (`step1_get_avgscore.py`); a reply without
  such a line is a failed sample (NaN).
"""
import hashlib
import json
import math
import re

from varedit_jax import images as imgs
from varedit_jax.eval import judge as jd

PQ_VERSION = "varedit-gedit-pq-v1"
PQ_PROMPT = (
    'You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated '
    'image(s) based on the given rules. You will have to give your output in this way (Keep your reasoning concise '
    'and short.):{"score": [...], "reasoning" : "..."} and don\'t output anything else.\n'
    'One image will be provided: an AI-generated image. Rate its perceptual quality on two scales from 0 to 10.\n'
    'The first score rates naturalness: 0 means the scene does not look natural at all (impossible lighting, '
    'shadows, perspective or proportions); 10 means it looks entirely natural.\n'
    'The second score rates artifacts: 0 means the image is dominated by artifacts (distortion, blur, noise, '
    'malformed objects or body parts, unusual textures); 10 means it has none.\n'
    "Put the scores in a list such that output score = [score1,score2], where 'score1' evaluates the naturalness "
    "and 'score2' evaluates the artifacts.\n")
_RUBRIC_LINE = re.compile(r"^[^:\n]+:\s*(\d+)\s*$")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def gedit_pq(judge: jd.Judge, sample_id: str, output) -> tuple[float, str | None]:
    """(PQ, error) of one edited image; PQ is NaN on a failed request or an unparseable reply."""
    key = _key(PQ_VERSION, judge.config.model, imgs.pixel_hash(output))
    reply, _, error = judge.ask(key, sample_id, PQ_PROMPT, [output], prompt=PQ_VERSION)
    parsed = jd.parse_scores(reply) if error is None else None
    if parsed is None:
        return math.nan, error or "unparseable reply"
    return float(min(parsed)), None


def gedit_scores(success: float, overedit: float, pq: float) -> dict[str, float]:
    """sc, pq, o of one sample from its GPT-Suc. / GPT-Over. and PQ (NaN propagates)."""
    sc = min(success, overedit) if not (math.isnan(success) or math.isnan(overedit)) else math.nan
    return dict(sc=sc, pq=pq, o=math.sqrt(sc * pq) if not (math.isnan(sc) or math.isnan(pq)) else math.nan)


def parse_rubric(reply: str | None) -> float | None:
    """Mean of the `<Name>: <digits>` lines of an ImgEdit-Bench reply, rounded to 2 decimals; None without one."""
    values = [int(m.group(1)) for line in (reply or "").splitlines() if (m := _RUBRIC_LINE.match(line.strip()))]
    return round(sum(values) / len(values), 2) if values else None


def imgedit_score(judge: jd.Judge, sample_id: str, source, output, instruction: str,
                  template: str) -> tuple[float, str | None]:
    """(score 1-5, error) of one ImgEdit-Bench sample with its edit type's prompt template."""
    text = template.replace("<edit_prompt>", instruction)
    key = _key("imgedit", judge.config.model, text, imgs.pixel_hash(source), imgs.pixel_hash(output))
    reply, _, error = judge.ask(key, sample_id, text, [source, output], prompt="imgedit_bench")
    score = parse_rubric(reply) if error is None else None
    return (math.nan, error or "no '<Name>: <score>' line in the reply") if score is None else (score, None)
