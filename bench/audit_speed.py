"""How long `tunesmith audit` takes on 100,000 chat rows, and how its memory grows.

The rows are banking77 queries (the bundled copy) made distinct: each gets six words drawn
from the copy's vocabulary and a random order number (so that two rows from the same query
are not near duplicates), keeps its intent as the answer, and carries one system message;
1% are exact copies of earlier rows and 1% copies with a typo. Wall time on a shared
machine depends on its load, so the CPU time of the process is printed too.
Lengths are counted with SmolLM2's chat template (pulled), as `tunesmith audit` does.
Each phase prints its wall and CPU seconds.

    OMP_NUM_THREADS=1 python bench/audit_speed.py --rows 100000 [--flip 0.05]

`--flip 0.05` gives 5% of the rows a wrong intent and scores the suspect-label check on
them (the check's recall and precision at this size; banking77's own file is too small
to reach the words-only path above 20,000 rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from tunesmith.data.audit import audit_data
from tunesmith.data.validate import load_tokenizer_quick
from tunesmith.models.registry import DEFAULT_MODEL, resolve_model

REPO = Path(__file__).resolve().parents[1]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    with open(REPO / "data" / "banking77" / "train.csv", newline="", encoding="utf-8") as fh:
        base = [(r["text"].replace("\n", " "), r["category"]) for r in csv.DictReader(fh)]
    vocab = sorted({w for t, _ in base for w in t.split()})
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        roll = rng.random()
        if i > 100 and roll < 0.01:
            rows.append(rows[rng.randrange(len(rows))])
            continue
        if i > 100 and roll < 0.02:
            src = rows[rng.randrange(len(rows))]
            text = src["messages"][1]["content"]
            k = rng.randrange(len(text))
            rows.append({"messages": [src["messages"][0], {"role": "user", "content": text[:k] + "x" + text[k + 1:]},
                                      src["messages"][2]]})
            continue
        text, label = rng.choice(base)
        words = " ".join(rng.choice(vocab) for _ in range(6))
        text = f"{text} {words} (order {rng.randrange(10**8):08d})"
        rows.append({"messages": [{"role": "system", "content": "You sort banking questions into intents."},
                                  {"role": "user", "content": text}, {"role": "assistant", "content": label}]})
    return rows


def flip_labels(rows: list[dict], share: float, seed: int = 1) -> set[int]:
    """Give `share` of the rows another intent at random; returns their JSONL lines."""
    labels = sorted({r["messages"][2]["content"] for r in rows})
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), round(share * len(rows)))
    for i in picked:
        given = rows[i]["messages"][2]["content"]
        answer = {"role": "assistant", "content": rng.choice([c for c in labels if c != given])}
        rows[i] = {"messages": [*rows[i]["messages"][:2], answer]}  # a copy: exact duplicates share dicts
    return {i + 1 for i in picked}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--flip", type=float, default=0.0,
                        help="share of rows given a wrong label, to score the suspect-label check at this size")
    args = parser.parse_args()
    tokenizer = load_tokenizer_quick(resolve_model(DEFAULT_MODEL))
    rows = make_rows(args.rows)
    flipped = flip_labels(rows, args.flip) if args.flip else set()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        start, cpu_start = time.perf_counter(), time.process_time()
        marks = []
        report = audit_data(path, tokenizer=tokenizer, log=lambda m: marks.append(
            (time.perf_counter() - start, time.process_time() - cpu_start, m)))
        total, cpu_end = time.perf_counter() - start, time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # Each phase's wall and CPU seconds (the process's CPU: the tokenizer's threads count).
    marks.append((total, cpu_end - cpu_start, "end"))
    print("  wall s   CPU s  phase")
    for (t, cpu, m), (t_next, cpu_next, _) in zip(marks, marks[1:]):
        print(f"  {t_next - t:6.1f}  {cpu_next - cpu:6.1f}  {m}")
    print(f"audited {args.rows:,} chat rows in {total:.1f} s wall, {cpu_end - cpu_start:.1f} s CPU; "
          f"peak RSS {usage.ru_maxrss / 1024:.0f} MB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps(report.counts()))
    print(json.dumps(report.stats.get("label_model")))
    if flipped:
        found = {f.line for f in report.of("suspect_label")}
        hit = len(found & flipped)
        print(f"flipped labels: {len(flipped):,} planted, {len(found):,} flagged, "
              f"recall {hit / len(flipped):.3f}, precision {hit / max(1, len(found)):.3f}")


if __name__ == "__main__":
    main()
