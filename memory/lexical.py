"""Lexical recall: BM25 (bm25s) over stemmed words, in English and Russian alike.

Measured on LoCoMo (`python -m bench memory`), lexical scoring finds the session that holds the
answer more often than a small dense model does; names, places and numbers are words. The
analyzer is bm25s's tokenizer with both languages' stop words and the Snowball stemmers of
PyStemmer chained: each leaves the other language's words as they are, so a message mixing
Russian and English is stemmed word by word ("собаку" and "собаки" both become "собак").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np


@cache
def _bm25s() -> Any:
    import bm25s

    # bm25s sets its own logger to DEBUG and logs every index it builds: quiet it.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


@cache
def _analyzer() -> tuple[Any, list[str]]:
    import Stemmer
    from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_RUSSIAN

    english, russian = Stemmer.Stemmer("english"), Stemmer.Stemmer("russian")

    def stem(words: list[str]) -> list[str]:
        return english.stemWords(russian.stemWords(words))

    return stem, [*STOPWORDS_EN, *STOPWORDS_RUSSIAN]


def analyze(texts: Sequence[str]) -> list[list[str]]:
    """Each text as the stems BM25 counts: lower-cased words, stop words dropped."""
    stem, stopwords = _analyzer()
    tokens: list[list[str]] = _bm25s().tokenize(
        list(texts), stopwords=stopwords, stemmer=stem, return_ids=False, show_progress=False,
    )
    return tokens


class LexicalIndex:
    """BM25 scores of one user's memories for a query; built once per user and cached."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        documents = analyze(texts)
        self._bm25: Any = None
        if any(documents):  # bm25s cannot index a corpus without a single word
            self._bm25 = _bm25s().BM25()
            self._bm25.index([words or [""] for words in documents], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """One BM25 score per memory, in index order; zeros when no word of the query is known."""
        if self._bm25 is None:
            return np.zeros(self.size, dtype=np.float32)
        known = self._bm25.get_tokens_ids(analyze([query])[0])
        if not known:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(known), dtype=np.float32)
