"""Near-duplicate texts in linear time: MinHash signatures (numpy) in an LSH index (banded
as datasketch's `MinHashLSH` bands them), each candidate confirmed by the exact Jaccard
similarity of the two texts' shingles.

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

import functools
import math
import re
from typing import Any, Iterable

from tunesmith.errors import UsageError

SHINGLE_CHARS = 3
NUM_PERM = 64
CANDIDATE_SLACK = 0.2
MAX_CANDIDATES = 50
"""Candidates checked per text; a text with more near-copies than this keeps the best of
the first 50 (its cluster is reported anyway, through the copies found)."""
DEFAULT_THRESHOLD = 0.8
ESTIMATE_SLACK = 0.3
"""A candidate whose MinHash values agree with the text's in fewer than (threshold - 0.3)
x 64 places skips the exact Jaccard check (most of the check's time on 100,000 rows). A
pair at the threshold falls below that with probability under 1e-6 (binomial tail, 64
permutations, any threshold from 0.5), against LSH's own miss rate of about 5% at 0.8."""

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


_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
"""splitmix64's finaliser constants: each 3-gram's exact 63-bit code is mixed into a
well-spread 64-bit hash before the permutations."""
PERMUTATION_SEED = 1
"""Fixed, so that an audit gives the same findings on every run and machine."""


@functools.lru_cache(maxsize=1)
def _permutations() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(PERMUTATION_SEED)
    a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
    return a, rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)


def minhash_signatures(norms: list[str]) -> Any:
    """MinHash signatures of normalised texts, an (n, NUM_PERM) uint32 array, in numpy.

    A 3-gram is its three code points packed into one 63-bit integer (exact, no hashing
    of strings), mixed by splitmix64's finaliser; the k-th permutation is the
    multiply-add-shift hash `(a_k x + b_k) mod 2**64 >> 32`, and a text's k-th value is
    the minimum over its 3-grams, taken for all texts at once with `minimum.reduceat`.
    datasketch's `MinHash.bulk` did the same per text with a Python hash call per
    shingle: 20 s of the audit's 54 s CPU on 100,000 rows, 0.5 s this way.
    A text of under 3 characters is one shingle, padded with NUL (which normalising
    never leaves in a text).
    """
    import numpy as np

    if not norms:
        return np.zeros((0, NUM_PERM), dtype=np.uint32)
    padded = [t if len(t) >= SHINGLE_CHARS else t.ljust(SHINGLE_CHARS, "\0") for t in norms]
    lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
    codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    grams = (codes[:-2] << np.uint64(42)) | (codes[1:-1] << np.uint64(21)) | codes[2:]
    # The last two positions of each text start no 3-gram of its own.
    ends = np.cumsum(lengths)
    starts_gram = np.ones(len(codes), dtype=bool)
    starts_gram[ends - 1] = starts_gram[ends - 2] = False
    x = grams[starts_gram[:-2]]
    x ^= x >> np.uint64(30)
    x *= np.uint64(_MIX1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_MIX2)
    x ^= x >> np.uint64(31)
    first = np.concatenate(([0], np.cumsum(lengths - 2)[:-1]))
    a, b = _permutations()
    out = np.empty((len(norms), NUM_PERM), dtype=np.uint64)
    hashed = np.empty_like(x)
    # One permutation at a time: a (3-grams x 64) matrix at once is 5x slower (cache).
    for k in range(NUM_PERM):
        np.multiply(x, a[k], out=hashed)
        hashed += b[k]
        out[:, k] = np.minimum.reduceat(hashed, first)
    return (out >> np.uint64(32)).astype(np.uint32)


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's `MinHashLSH` picks for this threshold
    (equal weights on false positives and negatives)."""
    try:
        from datasketch import MinHashLSH
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UsageError(INSTALL_HINT) from exc
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


class NearIndex:
    """Normalised texts added one at a time; `best_match` finds the most similar one added.

    LSH by banding, as datasketch's `MinHashLSH` does it (the same bands and rows): two
    texts are candidates when all of one band's signature values agree. Each band's values
    are folded into one 64-bit key in numpy, so adding and querying a text are a few
    dictionary look-ups; a key collision only adds a candidate, which the exact Jaccard
    check then drops.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.bands, self.band_rows = lsh_bands(max(0.3, threshold - CANDIDATE_SLACK))
        self._tables: list[dict[int, Any]] = [{} for _ in range(self.bands)]
        self._texts: list[str] = []
        self._values: list[Any] = []
        self._min_agreeing = math.ceil((threshold - ESTIMATE_SLACK) * NUM_PERM)

    def signatures(self, norms: list[str]) -> list[tuple[list[int], Any]]:
        """Per text, its LSH band keys (one int per band) and its MinHash values."""
        import numpy as np

        values = minhash_signatures(norms)
        wide = values.astype(np.uint64)
        keys = np.zeros((len(norms), self.bands), dtype=np.uint64)
        for band in range(self.bands):
            for col in range(band * self.band_rows, (band + 1) * self.band_rows):
                keys[:, band] = (keys[:, band] ^ wide[:, col]) * np.uint64(_MIX1)
        return list(zip(keys.tolist(), values))

    def add(self, norm: str, signature: tuple[list[int], Any]) -> int:
        """Index the text; returns its id (0, 1, ... in the order added)."""
        key = len(self._texts)
        self._texts.append(norm)
        self._values.append(signature[1])
        for table, band in zip(self._tables, signature[0]):
            # Most band keys belong to one text: an int, and a list only once shared.
            held = table.setdefault(band, key)
            if held != key:
                if isinstance(held, list):
                    held.append(key)
                else:
                    table[band] = [held, key]
        return key

    def candidates(self, signature: tuple[list[int], Any]) -> list[int]:
        """Ids of the indexed texts that share a band with this signature, ascending."""
        found: set[int] = set()
        for table, band in zip(self._tables, signature[0]):
            held = table.get(band)
            if held is None:
                continue
            if isinstance(held, list):
                found.update(held)
            else:
                found.add(held)
        return sorted(found)

    def best_match(self, norm: str, signature: tuple[list[int], Any]) -> tuple[int, float] | None:
        """(id, Jaccard) of the most similar indexed text at or above the threshold, or None."""
        import numpy as np

        best: tuple[int, float] | None = None
        candidates = self.candidates(signature)[:MAX_CANDIDATES]
        mine: set[str] | None = None
        values = signature[1]
        for key in candidates:
            if np.count_nonzero(self._values[key] == values) < self._min_agreeing:
                continue  # its MinHash estimate is far below the threshold
            mine = shingles(norm) if mine is None else mine
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
