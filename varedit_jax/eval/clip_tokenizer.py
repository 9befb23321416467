"""CLIP's byte-level BPE tokenizer, read from a Hugging Face folder's `vocab.json` + `merges.txt`.

Semantics of HF `CLIPTokenizerFast` (what torchmetrics' CLIPScore uses) with `truncation=True`:
  normalise: Unicode NFC, every whitespace run -> one space, strip, lowercase (no ftfy / html unescaping: OpenAI's
             `clip.tokenize` additionally runs ftfy and html.unescape, which only matters for broken or escaped text)
  split:     regex  's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+   (whitespace dropped)
  bytes:     each piece's UTF-8 bytes mapped to printable characters (GPT-2 byte table), "</w>" appended to its last
             character, then merged by the lowest-ranked pair of merges.txt until no merge applies
  ids:       [<|startoftext|>] + pieces[:context_length - 2] + [<|endoftext|>], right-padded with <|endoftext|>
Differences from the reference kept on purpose: special-token strings typed inside a text ("<|endoftext|>") are
encoded as plain text, and a piece missing from the vocabulary raises ValueError instead of becoming the unknown
token (a complete CLIP vocabulary holds every byte, so this only fires on broken tokenizer files).
"""
import functools
import json
import pathlib
import unicodedata

import numpy as np

try:
    import regex
except ImportError as e:  # \p{L} / \p{N} classes are not in the standard library's `re`
    raise ImportError("the CLIP tokenizer needs the `regex` package: pip install 'regex>=2023'") from e

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def byte_table() -> dict[int, str]:
    """The GPT-2 / CLIP map byte -> printable unicode character (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def normalize(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()


class ClipTokenizer:
    """`tokenizer(texts)` -> (ids (B, context_length) int32, lengths (B,) int32); ids[b, lengths[b] - 1] is EOS."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = 77):
        for special in (BOS, EOS):
            if special not in vocab:
                raise ValueError(f"CLIP vocabulary lacks the special token {special!r}")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.vocab, self.context_length = vocab, context_length
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

    @classmethod
    def from_folder(cls, folder, context_length: int = 77) -> "ClipTokenizer":
        """Reads `vocab.json` and `merges.txt` (a `#version` header line is skipped)."""
        folder = pathlib.Path(folder)
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder}: a CLIP tokenizer needs vocab.json and merges.txt ({e.filename} "
                                    f"is missing)") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'vocab.json'}: not JSON: {e}") from e
        merges = []
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{folder / 'merges.txt'}:{n}: expected two symbols, got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, context_length)

    def _merge(self, piece: str) -> tuple[str, ...]:
        """BPE of one byte-mapped piece, its last symbol carrying the end-of-word suffix."""
        word = tuple(piece[:-1]) + (piece[-1] + END_OF_WORD,)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """Ids of the text's pieces, without BOS / EOS and without truncation."""
        table = byte_table()
        ids = []
        for piece in _SPLIT.findall(normalize(text)):
            for symbol in self._bpe("".join(table[b] for b in piece.encode("utf-8"))):
                if symbol not in self.vocab:
                    raise ValueError(f"BPE symbol {symbol!r} (from {text!r}) is not in the CLIP vocabulary")
                ids.append(self.vocab[symbol])
        return ids

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts")
        ids = np.full((len(texts), self.context_length), self.eos_id, np.int32)
        lengths = np.zeros((len(texts),), np.int32)
        for b, text in enumerate(texts):
            row = [self.bos_id] + self.encode(text)[:self.context_length - 2] + [self.eos_id]
            ids[b, :len(row)] = row
            lengths[b] = len(row)
        return ids, lengths
