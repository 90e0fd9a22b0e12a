"""Draw the bundled BANKING77 subset from the full data set.

Keeps, in file order, the first 40 training rows and the first 10 test rows of every
one of the 77 intents, so the subset is balanced and reproducible. One intent
(contactless_not_working) has only 35 training rows in the full set, so train.csv holds
3,075 rows (not 77 x 40 = 3,080); test.csv holds 770.

    python data/banking77/make_subset.py /work/shared/data/banking77 data/banking77
"""

from __future__ import annotations

import csv
import shutil
import sys
from collections import Counter
from pathlib import Path

PER_INTENT = {"train.csv": 40, "test.csv": 10}


def subset(src: Path, dst: Path, per_intent: int) -> int:
    with open(src, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        label = header.index("category")
        taken: Counter[str] = Counter()
        rows = []
        for row in reader:
            if taken[row[label]] < per_intent:
                taken[row[label]] += 1
                rows.append(row)
    for intent, n in sorted(taken.items()):
        if n < per_intent:  # contactless_not_working has only 35 training rows in all
            print(f"{src}: intent {intent} has only {n} rows; all of them are kept")
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


def main(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name, per_intent in PER_INTENT.items():
        n = subset(src_dir / name, dst_dir / name, per_intent)
        print(f"{dst_dir / name}: {n} rows ({per_intent} per intent)")
    for name in ("categories.json", "LICENSE"):
        shutil.copyfile(src_dir / name, dst_dir / name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_subset.py SOURCE_DIR TARGET_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
