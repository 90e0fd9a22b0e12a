"""Near-duplicate texts in linear time: MinHash signatures in an LSH index (datasketch),
each candidate confirmed by the exact Jaccard similarity of the two texts' shingles.

A text is normalised first (lower case, punctuation dropped, whitespace collapsed), so
texts that differ only in case or punctuation are the same; what is left is compared as
sets of character 3-grams, which keeps a one-letter typo in a ten-word sentence at a
Jaccard similarity of about 0.85 (word shingles would drop it to about 0.75). The LSH
index looks for candidates at a lower threshold than the one asked (`CANDIDATE_SLACK`
below it), so that pairs just above the threshold are not lost to LSH's S-curve; the
exact check then keeps only pairs at or above the threshold.

    python -c "from tunesmith.data.near_duplicates import jaccard; print(jaccard('Top up?', 'top-up'))"
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Iterable

from tunesmith.errors import UsageError

SHINGLE_CHARS = 3
NUM_PERM = 64
CANDIDATE_SLACK = 0.2
MAX_CANDIDATES = 50
"""Candidates checked per text; a text with more near-copies than this keeps the best of
the first 50 (its cluster is reported anyway, through the copies found)."""
DEFAULT_THRESHOLD = 0.8

_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")

INSTALL_HINT = ("tunesmith audit needs the audit extra (datasketch, cleanlab, scikit-learn): "
                "pip install 'tunesmith[audit]'")


AUDIT_PACKAGES = {"datasketch": "datasketch", "cleanlab": "cleanlab", "sklearn": "scikit-learn"}


def require_audit_packages() -> None:
    """A UsageError that says how to install the audit extra, when any of it is missing."""
    import importlib.util

    missing = [pkg for mod, pkg in AUDIT_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise UsageError(f"{INSTALL_HINT} ({', '.join(missing)} not installed)")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def shingles(norm: str) -> set[str]:
    if len(norm) <= SHINGLE_CHARS:
        return {norm}
    return {norm[i:i + SHINGLE_CHARS] for i in range(len(norm) - SHINGLE_CHARS + 1)}


def jaccard(a: str, b: str) -> float:
    """Similarity of two texts as the audit measures it (after normalising)."""
    sa, sb = shingles(normalize(a)), shingles(normalize(b))
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def jaccard_normalized(a: str, b: str) -> float:
    """Jaccard similarity of two texts already normalised."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def _hash32(shingle: str) -> int:
    # CRC-32, in C: datasketch's default (SHA-1 per shingle, in Python) took half of the
    # audit's time on 100,000 rows. Python's own str hash is as fast but changes between
    # processes, and with it which pairs LSH proposes: an audit must give the same findings
    # on every run.
    return zlib.crc32(shingle.encode("utf-8"))


class NearIndex:
    """Normalised texts added one at a time; `best_match` finds the most similar one added."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise UsageError(INSTALL_HINT) from exc
        self._minhash = MinHash
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=max(0.3, threshold - CANDIDATE_SLACK), num_perm=NUM_PERM)
        self._texts: list[str] = []

    def signatures(self, norms: list[str]) -> list[Any]:
        """MinHash signatures of many normalised texts (datasketch's bulk path)."""
        sets = [list(shingles(t)) for t in norms]
        return self._minhash.bulk(sets, num_perm=NUM_PERM, seed=1, hashfunc=_hash32)

    def add(self, norm: str, signature: Any) -> int:
        """Index the text; returns its id (0, 1, ... in the order added)."""
        key = len(self._texts)
        self._texts.append(norm)
        self._lsh.insert(key, signature, check_duplication=False)
        return key

    def best_match(self, norm: str, signature: Any) -> tuple[int, float] | None:
        """(id, Jaccard) of the most similar indexed text at or above the threshold, or None."""
        best: tuple[int, float] | None = None
        candidates = sorted(self._lsh.query(signature))[:MAX_CANDIDATES]
        mine = shingles(norm) if candidates else set()
        for key in candidates:
            theirs = shingles(self._texts[key])
            sim = len(mine & theirs) / len(mine | theirs)
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best

    def __len__(self) -> int:
        return len(self._texts)


def chunked(items: list[str], size: int = 4096) -> Iterable[tuple[int, list[str]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]
