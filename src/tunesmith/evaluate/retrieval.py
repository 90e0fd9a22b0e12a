"""Okapi BM25 over training inputs, for retrieval few-shot prompts in `tunesmith compare`.

Why BM25 and not embeddings: it needs no model download or extra package, indexes ten
thousand short queries in well under a second, and on short task inputs (intents,
tickets, questions) the nearest examples by shared words are the ones that help most.
See docs/evaluation.md.

    python -c "from tunesmith.evaluate.retrieval import BM25; print(BM25(['a b', 'c']).top_k('b', 1))"
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """BM25 with the usual k1 = 1.5, b = 0.75 and the non-negative idf of Lucene."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_len = sum(self.lengths) / len(self.lengths) if self.lengths else 0.0
        df: Counter[str] = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        # Inverted index: only documents sharing a term with the query are scored.
        self.postings: dict[str, list[int]] = {}
        for i, d in enumerate(self.docs):
            for t in d:
                self.postings.setdefault(t, []).append(i)

    def scores(self, query: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for t in set(tokenize(query)):
            idf = self.idf.get(t)
            if idf is None:
                continue
            for i in self.postings[t]:
                tf = self.docs[i][t]
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / (self.avg_len or 1))
                out[i] = out.get(i, 0.0) + idf * tf * (self.k1 + 1) / norm
        return out

    def top_k(self, query: str, k: int, exclude: set[int] | None = None) -> list[int]:
        """Indices of the k best documents, best first (ties by index; documents sharing no
        word with the query fill the list in index order)."""
        scored = self.scores(query)
        ranked = sorted(scored, key=lambda i: (-scored[i], i))
        if exclude:
            ranked = [i for i in ranked if i not in exclude]
        if len(ranked) < k:
            seen = set(ranked) | (exclude or set())
            ranked += [i for i in range(len(self.docs)) if i not in seen][: k - len(ranked)]
        return ranked[:k]
