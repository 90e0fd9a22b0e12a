"""Recall and precision of `tunesmith audit` on faults planted in the bundled banking77 copy.

Planted into a copy of data/banking77/train.csv (the originals stay untouched):
- exact duplicates: 100 rows copied as they are;
- near duplicates: 150 rows copied with one change, a third each: a one-letter typo, the
  case changed, the punctuation changed;
- leakage: 100 rows of data/banking77/test.csv copied into training;
- flipped labels: 5% of the original rows (153) given another intent at random.
Copies are appended after the originals, so each finding should point from the copy to its
source. The clean copy is audited too: what it already holds (banking77's own near
duplicates and test-like rows, its own label noise) is reported beside the strict numbers.

A cheap proxy for the effect on training (not a tunesmith fine-tune): the test accuracy of
the same TF-IDF + linear SVM trained on the clean copy, the planted copy, and the
planted copy after `--fix` (with `--fix-labels drop` and `relabel`).

    OMP_NUM_THREADS=1 python bench/audit_planted.py [--out audit_planted.json] [--embeddings]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import string
import tempfile
import time
from pathlib import Path

from tunesmith.data.audit import audit_data
from tunesmith.data.audit_fix import write_fixed
from tunesmith.data.example import ColumnMapping

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ColumnMapping("text", "category")


def read(name: str) -> list[tuple[str, str]]:
    with open(REPO / "data" / "banking77" / name, newline="", encoding="utf-8") as fh:
        return [(r["text"].replace("\n", " "), r["category"]) for r in csv.DictReader(fh)]


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["text", "category"])
        w.writerows(rows)
    return path


def typo(text: str, rng: random.Random) -> str:
    spots = [i for i, c in enumerate(text) if c.isalpha()]
    i = rng.choice(spots)
    how = rng.choice(("replace", "drop", "double", "swap"))
    if how == "replace":
        return text[:i] + rng.choice([c for c in string.ascii_lowercase if c != text[i].lower()]) + text[i + 1:]
    if how == "drop":
        return text[:i] + text[i + 1:]
    if how == "double":
        return text[:i] + text[i] + text[i:]
    j = min(i + 1, len(text) - 1)
    return text[:i] + text[j] + text[i] + text[j + 1:]


def recase(text: str, rng: random.Random) -> str:
    return text.lower() if text != text.lower() else text.upper()


def repunctuate(text: str, rng: random.Random) -> str:
    stripped = text.rstrip("?.!")
    if stripped != text:
        return stripped
    return text + rng.choice(("?", ".", "!", " ?"))


def plant(train: list[tuple[str, str]], test: list[tuple[str, str]], seed: int = 0, flip_share: float = 0.05):
    rng = random.Random(seed)
    labels = sorted({c for _, c in train})
    rows = list(train)
    flipped = set(rng.sample(range(len(train)), round(flip_share * len(train))))
    for i in flipped:
        rows[i] = (rows[i][0], rng.choice([c for c in labels if c != rows[i][1]]))
    planted: dict[str, dict[int, int]] = {"exact_duplicate": {}, "near_duplicate": {}, "leakage": {}}
    line = lambda i: i + 2  # noqa: E731 (header on line 1)
    # Copies are made of rows whose label is right, so that each fault stays one fault.
    sources = [i for i in range(len(train)) if i not in flipped]
    for _ in range(100):
        src = rng.choice(sources)
        rows.append(rows[src])
        planted["exact_duplicate"][line(len(rows) - 1)] = line(src)
    for k in range(150):
        src = rng.choice(sources)
        change = (typo, recase, repunctuate)[k % 3]
        rows.append((change(rows[src][0], rng), rows[src][1]))
        planted["near_duplicate"][line(len(rows) - 1)] = line(src)
    for src in rng.sample(range(len(test)), 100):
        rows.append(test[src])
        planted["leakage"][line(len(rows) - 1)] = line(src)
    return rows, planted, {line(i) for i in flipped}


def score(found: set[int], truth: set[int], baseline: set[int]) -> dict:
    hit = len(found & truth)
    extra = found - truth
    return {"planted": len(truth), "flagged": len(found), "found": hit,
            "recall": round(hit / len(truth), 3), "precision": round(hit / max(1, len(found)), 3),
            "precision_beyond_clean_copy": round(hit / max(1, len(found) - len(extra & baseline)), 3)}


def proxy_accuracy(rows: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Test accuracy of TF-IDF (words + characters) and a linear SVM trained on `rows`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion, make_pipeline
    from sklearn.svm import LinearSVC

    model = make_pipeline(FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2))]), LinearSVC())
    model.fit([t for t, _ in rows], [c for _, c in rows])
    return round(float((model.predict([t for t, _ in test]) == [c for _, c in test]).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = read("train.csv"), read("test.csv")
    rows, planted, flipped = plant(train, test, args.seed)
    tmp = Path(tempfile.mkdtemp())
    test_path = write(tmp / "test.csv", test)
    clean = audit_data(write(tmp / "clean.csv", train), test=test_path, columns=COLUMNS)
    start = time.perf_counter()
    report = audit_data(write(tmp / "train.csv", rows), test=test_path, columns=COLUMNS)
    seconds = time.perf_counter() - start
    results = {"rows": len(rows), "seconds": round(seconds, 1), "label_model": report.stats.get("label_model")}
    for check, truth in planted.items():
        findings = report.of(check)
        base = {f.line for f in clean.of(check)}
        results[check] = score({f.line for f in findings}, set(truth), base)
        # A finding counts only if it points at the planted row's source.
        results[check]["right_source"] = sum(truth.get(f.line) == f.other_line for f in findings)
    base = {f.line for f in clean.of("suspect_label")}
    suspects = report.of("suspect_label")
    results["flipped_label"] = score({f.line for f in suspects}, flipped, base)
    results["flipped_label"]["suggested_the_true_label"] = sum(
        f.line in flipped and f.details["suggested_label"] == train[f.line - 2][1] for f in suspects)
    for threshold in (0.5, 0.8, 0.9, 0.95):
        kept = {f.line for f in suspects if f.confidence >= threshold}
        results[f"flipped_label_confidence_{threshold}"] = score(kept, flipped, base)
    results["clean_copy_counts"] = clean.counts()
    leaked = set(planted["leakage"])
    # Leaked test rows lift the planted copy's test score; without them the planted copy
    # shows what the flipped labels (and duplicates) alone cost.
    accuracy = {"clean": proxy_accuracy(train, test), "planted": proxy_accuracy(rows, test),
                "planted_without_leaked_rows": proxy_accuracy(
                    [r for i, r in enumerate(rows) if i + 2 not in leaked], test)}
    for how in ("drop", "relabel"):
        fixed = write_fixed(report, tmp / f"fixed-{how}.csv", COLUMNS, labels=how, min_confidence=0.9)
        with open(fixed.out, newline="", encoding="utf-8") as fh:
            accuracy[f"fixed_{how}"] = proxy_accuracy([(r["text"], r["category"]) for r in csv.DictReader(fh)], test)
        accuracy[f"fixed_{how}_rows"] = fixed.kept
    results["proxy_test_accuracy"] = accuracy
    shutil.rmtree(tmp)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
