"""The `tunesmith audit` command: exit codes, --json, --fix, --report into the HTML report.

The first test runs the real executable; the others call the same command line in this
process (tests/in_process.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from in_process import run_tunesmith

REPO = Path(__file__).resolve().parents[2]
TUNESMITH = str(Path(sys.executable).parent / "tunesmith")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([TUNESMITH, *args], capture_output=True, text=True, env=env, timeout=300)


def banking77(name: str, step: int) -> list[list[str]]:
    with open(REPO / "data" / "banking77" / name, newline="", encoding="utf-8") as fh:
        return [[r["text"].replace("\n", " "), r["category"]] for r in csv.DictReader(fh)][::step]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["text", "category"])
        w.writerows(rows)
    return path


def test_leakage_exits_1_and_json_names_both_lines(tmp_path, tiny_model_dir):
    train, test = banking77("train.csv", 5), banking77("test.csv", 10)
    # test.csv rows 0 and 40 (lines 2 and 42) copied into training: its last two lines.
    train_path = write_csv(tmp_path / "train.csv", train + [test[0], test[40]])
    test_path = write_csv(tmp_path / "test.csv", test)
    proc = cli("audit", str(train_path), "--test", str(test_path), "--input-column", "text",
               "--output-column", "category", "--model", str(tiny_model_dir), "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out) == ["ok", "threshold", "files", "counts", "stats", "findings"]
    assert out["ok"] is False and out["files"]["train"]["examples"] == len(train) + 2
    leaks = {(f["line"], f["other_line"]) for f in out["findings"] if f["check"] == "leakage" and f["similarity"] == 1.0}
    assert {(len(train) + 2, 2), (len(train) + 3, 42)} <= leaks
    assert out["counts"]["leakage"] == len([f for f in out["findings"] if f["check"] == "leakage"])
    assert out["stats"]["lengths"]["unit"] == "tokens"
    assert out["stats"]["label_model"]["rows"] == len(train) + 2


def test_fix_and_report(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": c}]}
            for t, c in banking77("train.csv", 8)]
    rows.append(rows[3])  # an exact duplicate, the last line
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    run = tmp_path / "run"
    run.mkdir()
    proc = run_tunesmith("audit", str(src), "--model", str(tiny_model_dir), "--fix", str(tmp_path / "clean.jsonl"),
               "--report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "exact duplicates: 1" in proc.stdout and f"train.jsonl:{len(rows)}: the same example as line 4" in proc.stdout
    assert "dropped (exact_duplicate): lines " in proc.stdout
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    audit = json.loads((run / "audit.json").read_text())
    dropped = {n for lines in audit["fix"]["dropped"].values() for n in lines}
    assert len(rows) in dropped
    clean = (tmp_path / "clean.jsonl").read_text().splitlines()
    assert len(clean) == len(rows) - len(dropped) == audit["fix"]["kept"]
    report = run_tunesmith("report", str(run))
    assert report.returncode == 0, report.stderr
    html = (run / "report.html").read_text()
    assert "<h2 id=audit>Data audit</h2>" in html and "the same example as line 4" in html


def test_fix_labels_needs_fix(tmp_path, tiny_model_dir):
    path = write_csv(tmp_path / "t.csv", banking77("train.csv", 50))
    proc = run_tunesmith("audit", str(path), "--input-column", "text", "--output-column", "category",
               "--model", str(tiny_model_dir), "--fix-labels", "relabel")
    assert proc.returncode == 2 and "--fix-labels takes drop or relabel and needs --fix OUT" in proc.stderr
