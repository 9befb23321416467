"""The toy text encoder of the tiny default: a sentencepiece model trained on the toy instructions and a random-init
T5 v1.1 encoder (`configs/toy_text.py` sizes).

Folder layout (`build(out_dir, corpus, seed=...)`):
  checkpoints/0/        an orbax checkpoint of kind "t5" (`checkpoint.save_params`): the encoder's params and the
                        stored text-encoder config (`text.encoder_config`, with the sentencepiece model inside), so
                        the folder loads wherever a text encoder is taken (`loading.load_text_encoder(out_dir)`)
  spiece.model          the same sentencepiece model as a file (the data pipeline's `data.spiece_model`)
  toy_text_encoder.json the build inputs; a folder built from the same inputs is reused, one built from other
                        inputs is rebuilt, any other non-empty folder is refused
"""
import hashlib
import io
import json
import logging
import pathlib
import shutil
import tempfile
import unicodedata

import sentencepiece as spm
from flax import nnx

from varedit_jax import checkpoint, text
from varedit_jax.params import param_dict

MANIFEST = "toy_text_encoder.json"
log = logging.getLogger(__name__)


def train_spiece(corpus: list[str], vocab_size: int, seed: int) -> bytes:
    """A sentencepiece unigram model (T5 ids: <pad> 0, </s> 1, <unk> 2, no BOS; NFKC; no byte fallback) of a corpus.

    `vocab_size` is an upper bound: small corpora get what they support (at least every character + 3 specials).
    """
    sentences = [s for s in corpus if s.strip()]
    if not sentences:
        raise ValueError("the sentencepiece corpus has no non-blank text")
    chars = {c for s in sentences for c in unicodedata.normalize("NFKC", s) if not c.isspace()}
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram",
        vocab_size=max(vocab_size, len(chars) + 4), hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, normalization_rule_name="nmt_nfkc", byte_fallback=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def build(out_dir, corpus: list[str], *, seed: int, d_model: int = 64, d_kv: int = 16, num_heads: int = 4,
          d_ff: int = 128, num_layers: int = 2, vocab_size: int = 512) -> pathlib.Path:
    """Builds (or reuses) the toy text encoder folder at `out_dir` (see the module docstring): a sentencepiece model
    of `corpus` (vocab <= vocab_size, what the corpus supports) and a random-init (`seed`) encoder. Deterministic
    for (corpus, seed, sizes)."""
    out = pathlib.Path(out_dir).expanduser().resolve()
    manifest = dict(seed=seed, d_model=d_model, d_kv=d_kv, num_heads=num_heads, d_ff=d_ff, num_layers=num_layers,
                    vocab_size=vocab_size, corpus_sha256=hashlib.sha256(json.dumps(list(corpus)).encode()).hexdigest())
    if out.exists():
        previous = out / MANIFEST
        if previous.is_file():
            if json.loads(previous.read_text()) == manifest:
                return out
            log.info("rebuilding the toy text encoder at %s (inputs changed)", out)
        elif any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a toy text encoder folder (no {MANIFEST})")
    proto = train_spiece(corpus, vocab_size, seed)
    model_cfg = text.default_model_config(
        vocab_size=text.TextTokenizer.from_proto(proto).vocab_size, d_model=d_model, d_kv=d_kv,
        num_heads=num_heads, d_ff=d_ff, num_layers=num_layers)
    params = param_dict(text.T5Encoder(model_cfg, rngs=nnx.Rngs(seed)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        checkpoint.save_params(tmp / "checkpoints", params, text.encoder_config(model_cfg, spiece_proto=proto))
        (tmp / text.SPIECE_FILE).write_bytes(proto)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
