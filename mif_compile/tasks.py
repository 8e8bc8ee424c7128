"""Long-context probes for ``mif_compile.evaluate``: the haystack text, the retrieval formats, samples.

Two retrieval formats share one sample layout, ``haystack-with-needles, then (query, answer)*``:

- :class:`TextFormat` for any HF causal LM with a tokenizer: RULER-like sentences ("One of the
  special magic numbers for {key} is: {value}.") with random words as keys and 7-digit values.
- :class:`SymbolFormat` for the built-in byte-level model (``train/train_retrieval.py``): a needle is
  the three bytes ``NEEDLE key value``, a query ``QUERY key`` followed by its one-byte answer; keys
  and values are non-ASCII bytes (128-191, 192-255), which never occur in the ASCII haystack.

The haystack is real text: a file the user gives, or by default the Python standard library's own
source files (read from the directory of ``inspect``), so no machine needs a download.
Every sample has exactly the requested length in tokens (the haystack is cut to fit).
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import os
import random
from typing import Protocol, Sequence

__all__ = ["ByteTokenizer", "SymbolFormat", "TextFormat", "Sample", "default_text", "load_text",
           "needle_sample", "multikey_sample", "text_window"]

NEEDLE, QUERY = 1, 2  # SymbolFormat's marker bytes (control characters: absent from the haystack)
KEY_BASE, VALUE_BASE, N_SYMBOLS = 128, 192, 64


def default_text(max_chars: int = 4_000_000) -> str:
    """The standard library's ``*.py`` files (sorted, concatenated), at most ``max_chars``."""
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(inspect.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def load_text(path: str | None) -> str:
    if path is None:
        return default_text()
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: the text is empty")
    return text


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """The built-in model's tokenizer: one token per ASCII byte; other characters become '?'."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("ascii", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i if i < 128 else 63 for i in ids).decode("ascii")


class HFTokenizer:
    """A transformers tokenizer, without special tokens (the caller adds BOS once)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class SymbolFormat:
    """Byte-level needles for the built-in model: ``[NEEDLE, k, v]``; query ``[QUERY, k]``; answer ``[v]``."""

    name: str = "symbol"
    prefix: tuple[int, ...] = ()

    def keys(self, rng: random.Random, n: int) -> list:
        return [KEY_BASE + i for i in rng.sample(range(N_SYMBOLS), n)]

    def values(self, rng: random.Random, n: int) -> list:
        return [VALUE_BASE + rng.randrange(N_SYMBOLS) for _ in range(n)]

    def needle(self, key, value) -> list[int]:
        return [NEEDLE, key, value]

    def query(self, key) -> list[int]:
        return [QUERY, key]

    def answer(self, value) -> list[int]:
        return [value]


_WORDS = ("amber basil cedar delta ember falcon garnet harbor indigo jasper kestrel lotus meadow nimbus onyx "
          "pepper quartz raven saffron tundra umber violet willow xenon yarrow zephyr acorn bramble cobalt dune "
          "fennel glacier hazel iris juniper kelp lilac marble nectar olive pebble quill reef sable thistle "
          "utopia vapor walnut yonder zinnia").split()


class TextFormat:
    """RULER-like sentences for a model with a tokenizer (keys: word pairs, values: 7-digit numbers)."""

    name = "text"

    def __init__(self, tokenizer: HFTokenizer):
        self.tok = tokenizer
        self.prefix = tuple(tokenizer.bos)

    def keys(self, rng: random.Random, n: int) -> list:
        pairs = set()
        while len(pairs) < n:
            pairs.add(f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}")
        return sorted(pairs, key=lambda _: rng.random())

    def values(self, rng: random.Random, n: int) -> list:
        return [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(n)]

    def needle(self, key, value) -> list[int]:
        return self.tok.encode(f"\nOne of the special magic numbers for {key} is: {value}.\n")

    def query(self, key) -> list[int]:
        return self.tok.encode(f"\nWhat is the special magic number for {key}? The special magic number for {key} is:")

    def answer(self, value) -> list[int]:
        return self.tok.encode(f" {value}")


@dataclasses.dataclass
class Sample:
    """``ids`` (the whole forward input) and, per answer, ``(start, token ids)``: ``ids[start:start+len]``
    must be predicted from the positions before it (scored by exact match of every token)."""

    ids: list[int]
    answers: list[tuple[int, list[int]]]


def _haystack(hay: Sequence[int], rng: random.Random, n: int) -> list[int]:
    if n <= 0:
        return []
    if len(hay) < n:
        reps = n // max(1, len(hay)) + 1
        hay = list(hay) * reps
    start = rng.randrange(len(hay) - n + 1)
    return list(hay[start:start + n])


def _build(fmt, hay, rng: random.Random, length: int, pairs, depths: Sequence[float]) -> Sample:
    needles = [fmt.needle(k, v) for k, v in pairs]
    answers = []
    order = list(range(len(pairs)))
    rng.shuffle(order)
    q_parts = []
    for i in order:
        k, v = pairs[i]
        q_parts.append((fmt.query(k), fmt.answer(v)))
    n_fixed = len(fmt.prefix) + sum(map(len, needles)) + sum(len(q) + len(a) for q, a in q_parts)
    n_hay = length - n_fixed
    if n_hay < 0:
        raise ValueError(f"length {length} is too short for {len(pairs)} needle(s) ({n_fixed} tokens without haystack)")
    filler = _haystack(hay, rng, n_hay)
    cuts = sorted((min(n_hay, max(0, round(d * n_hay))), j) for j, d in enumerate(depths))
    body, prev = list(fmt.prefix), 0
    for cut, j in cuts:
        body += filler[prev:cut] + needles[j]
        prev = cut
    body += filler[prev:]
    for q, a in q_parts:
        body += q
        answers.append((len(body), list(a)))
        body += a
    assert len(body) == length, (len(body), length)
    return Sample(body, answers)


def needle_sample(fmt, hay: Sequence[int], length: int, depth: float, seed: int) -> Sample:
    """One needle at ``depth`` (0 = start of the haystack, 1 = just before the question)."""
    rng = random.Random(seed)
    pair = list(zip(fmt.keys(rng, 1), fmt.values(rng, 1)))
    return _build(fmt, hay, rng, length, pair, [depth])


def multikey_sample(fmt, hay: Sequence[int], length: int, n_keys: int, seed: int) -> Sample:
    """``n_keys`` needles at uniform random depths, every key queried (in random order) at the end."""
    rng = random.Random(seed)
    pairs = list(zip(fmt.keys(rng, n_keys), fmt.values(rng, n_keys)))
    depths = [rng.random() for _ in pairs]
    return _build(fmt, hay, rng, length, pairs, depths)


def text_window(fmt, hay: Sequence[int], length: int, seed: int) -> list[int]:
    """``length`` tokens of plain text (the perplexity probe)."""
    rng = random.Random(seed)
    return list(fmt.prefix) + _haystack(hay, rng, length - len(fmt.prefix))
