"""Text as token ids: characters for next-character prediction, words for classification.

- Characters (Shakespeare, LEAF: Caldas et al. 2018, arXiv 1812.01097; McMahan et al. 2017):
  x = int64 ids [n, T] of T characters, y = id of the next character; `LEAF_CHARS` is LEAF's
  80-character vocabulary (``vocab: leaf``), or the sorted characters of the data
  (``vocab: data``).
- Words (Sent140-style classification): lower-cased word/punctuation tokens, a vocabulary of
  the `vocab_size` most frequent training tokens (ids 0 = padding, 1 = unknown), each text cut
  or right-padded to `seq_len` ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from fedsim.errors import ConfigError

LEAF_CHARS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
              "abcdefghijklmnopqrstuvwxyz}")
PAD, UNK = "<pad>", "<unk>"
Tokens = Literal["chars", "words"]
CharVocab = Literal["leaf", "data"]
PosInt = Annotated[int, Field(gt=0)]
_WORD = re.compile(r"[\w']+|[.,!?;]")


def char_vocab(kind: CharVocab, texts: Sequence[str]) -> tuple[str, ...]:
    """LEAF's 80 characters, or the sorted distinct characters of `texts`."""
    if kind == "leaf":
        return tuple(LEAF_CHARS)
    return tuple(sorted(set("".join(texts))))


def encode_chars(texts: Sequence[str], vocab: tuple[str, ...], *, file: str | None,
                 key: str) -> np.ndarray:
    """int64 ids [n, T] of n equally long strings (vectorised over all characters).

    A character outside `vocab` or strings of different lengths are ConfigErrors.
    """
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    if len(texts) and lengths.min() != lengths.max():
        i = int(np.argmax(lengths != lengths[0]))
        raise ConfigError("text inputs have different lengths", file=file, key=key,
                          value=f"row 0 has {lengths[0]} characters, row {i} has {lengths[i]}",
                          allowed="sequences of one length (LEAF Shakespeare: 80)")
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    table = np.full(max((ord(c) for c in vocab), default=0) + 2, -1, dtype=np.int64)
    table[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = table[np.minimum(codes, len(table) - 1)]
    if (ids < 0).any():
        bad = chr(int(codes[int(np.argmax(ids < 0))]))
        raise ConfigError("a character is not in the vocabulary", file=file, key=key,
                          value=bad, allowed="vocab: data (the characters of the training "
                          "text) or text made of LEAF's 80 characters")
    return ids.reshape(len(texts), int(lengths[0]) if len(texts) else 0)


def word_vocab(texts: Sequence[str], size: int) -> tuple[str, ...]:
    """<pad>, <unk>, then the `size` most frequent tokens (ties in lexical order)."""
    counts = Counter(tok for t in texts for tok in _WORD.findall(t.lower()))
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return (PAD, UNK, *(w for w, _ in best))


def encode_words(texts: Sequence[str], vocab: tuple[str, ...], seq_len: int) -> np.ndarray:
    """int64 ids [n, seq_len]: the first seq_len tokens, unknown -> 1, right-padded with 0."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(texts), seq_len), dtype=np.int64)
    for r, t in enumerate(texts):
        ids = [index.get(tok, 1) for tok in _WORD.findall(t.lower())[:seq_len]]
        out[r, :len(ids)] = ids
    return out


def next_char_labels(labels: Sequence[str], vocab: tuple[str, ...], *, file: str | None,
                     key: str) -> np.ndarray:
    """int64 ids [n] of one-character label strings (the character after each sequence)."""
    if any(len(c) != 1 for c in labels):
        bad = next(c for c in labels if len(c) != 1)
        raise ConfigError("next-character labels must be single characters", file=file,
                          key=key, value=bad, allowed="one character per sample")
    return encode_chars(list(labels), vocab, file=file, key=key).reshape(-1)


def encode_text(train: Sequence[str], test: Sequence[str], *, tokens: Tokens, vocab: CharVocab,
                seq_len: int, vocab_size: int, file: str | None, key: str,
                labels: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(train ids, test ids, vocabulary).

    Characters: ``vocab: data`` takes every character of both splits and of the next-character
    `labels` (a fixed alphabet, not a learned statistic). Words: the vocabulary counts the
    training text only; test words outside it map to <unk>.
    """
    if tokens == "chars":
        v = char_vocab(vocab, [*train, *test, *labels])
        return (encode_chars(train, v, file=file, key=key),
                encode_chars(test, v, file=file, key=key), v)
    v = word_vocab(train, vocab_size)
    return encode_words(train, v, seq_len), encode_words(test, v, seq_len), v


def is_text(values: Sequence[object]) -> bool:
    return len(values) > 0 and isinstance(values[0], str)
