"""`tunesmith audit` on real data: banking77 rows with faults planted at known lines."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

from tunesmith.data.audit import audit_data
from tunesmith.data.audit_fix import write_fixed
from tunesmith.data.example import ColumnMapping
from tunesmith.data.near_duplicates import jaccard
from tunesmith.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ColumnMapping("text", "category")


def banking77(name: str) -> list[tuple[str, str]]:
    with open(REPO / "data" / "banking77" / name, newline="", encoding="utf-8") as fh:
        return [(r["text"], r["category"]) for r in csv.DictReader(fh)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["text", "category"])
        w.writerows(rows)
    return path


def line_of(i: int) -> int:
    """The CSV line of row i (0-based) as written by write_csv: header on line 1, one line a row."""
    return i + 2


def single_line(rows):
    return [(t.replace("\n", " "), c) for t, c in rows]


@pytest.fixture(scope="module")
def small():
    """Every 10th training row (about 300, all 77 intents) and 100 test rows, one line each."""
    return single_line(banking77("train.csv")[::10]), single_line(banking77("test.csv")[::7])


def test_planted_duplicates_leakage_and_conflicts_are_found_at_their_lines(tmp_path, small):
    train, test = small
    clean = audit_data(write_csv(tmp_path / "clean.csv", train), test=write_csv(tmp_path / "test.csv", test),
                       columns=COLUMNS, labels=False)
    # What the clean copy already has (banking77's own near-duplicates) is not planted.
    baseline = {(f.check, f.line) for f in clean.findings if f.check != "pii"}

    text, label = train[5]
    planted = {
        "exact_duplicate": (text, label, 5),
        "near_duplicate": (text.upper().rstrip("?.!") + " !!", label, 5),
        "conflicting_answer": (train[9][0], "wrong_label_here", 9),
    }
    typo_src = train[20][0]
    k = len(typo_src) // 2
    typo = typo_src[:k] + ("x" if typo_src[k] != "x" else "y") + typo_src[k + 1:]
    assert jaccard(typo, typo_src) >= 0.8
    rows = list(train)
    expected = {}
    for check, (t, c, src) in planted.items():
        rows.append((t, c))
        expected[(check, line_of(len(rows) - 1))] = line_of(src)
    rows.append((typo, train[20][1]))
    expected[("near_duplicate", line_of(len(rows) - 1))] = line_of(20)
    rows.append(test[3])
    expected[("leakage", line_of(len(rows) - 1))] = line_of(3)
    expected[("rare_label", line_of(len(train) + 2))] = None  # the conflicting row's label is new

    report = audit_data(write_csv(tmp_path / "train.csv", rows), test=tmp_path / "test.csv",
                        columns=COLUMNS, labels=False)
    new = {(f.check, f.line): f for f in report.findings if (f.check, f.line) not in baseline and f.check != "pii"}
    assert {key: f.other_line for key, f in new.items()} == expected
    assert new[("exact_duplicate", line_of(len(train)))].similarity == 1.0
    assert new[("leakage", line_of(len(rows) - 1))].other_file == "test.csv"
    assert new[("conflicting_answer", line_of(len(train) + 2))].details["other_answer"] == train[9][1]
    assert report.ok is False and clean.ok == (not any(f.check == "leakage" for f in clean.findings))


def test_flipped_labels_are_suspects_with_the_true_label_suggested():
    # The whole bundled copy (40 rows per intent): with 10 per intent the classifier is
    # right on only 62% of rows out of fold and flags more hard rows than flipped ones.
    rows = single_line(banking77("train.csv"))
    labels = sorted({c for _, c in rows})
    rng = random.Random(1)
    flipped = set(rng.sample(range(len(rows)), len(rows) // 20))
    noisy = [(t, rng.choice([x for x in labels if x != c]) if i in flipped else c) for i, (t, c) in enumerate(rows)]

    from tunesmith.data.label_issues import find_suspect_labels

    suspects, info = find_suspect_labels([t for t, _ in noisy], [c for _, c in noisy])
    found = {s.index for s in suspects}
    recall = len(found & flipped) / len(flipped)
    precision = len(found & flipped) / len(found)
    assert info["rows"] == len(rows) and info["labels"] == 77 and 0.6 < info["out_of_fold_accuracy"] < 1
    assert recall >= 0.6 and precision >= 0.5, (recall, precision)
    right = [s for s in suspects if s.index in flipped and s.suggested == rows[s.index][1]]
    assert len(right) >= 0.5 * len(found & flipped)
    assert all(0 <= s.confidence <= 1 for s in suspects)
    assert [s.confidence for s in suspects] == sorted((s.confidence for s in suspects), reverse=True)


def test_chat_jsonl_pii_lengths_and_answers(tmp_path, tiny_tokenizer):
    def ex(user, answer, system="You answer banking questions."):
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]}

    rows = [ex(t, c) for t, c in single_line(banking77("train.csv")[::60])]
    rows.append(ex("My card 4111 1111 1111 1111 was charged twice, mail ann.lee@example.com", "card_payment_fee_charged"))
    rows.append(ex("Refund to GB82 WEST 1234 5698 7654 32 please", " "))
    rows.append(ex("why " * 400, "As an AI language model, I cannot help with that."))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(rows)
    report = audit_data(path, tokenizer=tiny_tokenizer, labels=False)
    pii = [(f.line, f.details["kind"], f.details["field"], tuple(f.details["span"])) for f in report.of("pii")]
    user = rows[n - 3]["messages"][1]["content"]
    start = user.index("4111")
    # The row with the empty answer is refused by the reader, so its IBAN is not seen.
    assert pii == [(n - 2, "card_number", "messages[1]", (start, start + 19)),
                   (n - 2, "email", "messages[1]", (user.index("ann"), len(user)))]
    assert [f.line for f in report.of("empty_answer")] == [n - 1]
    assert [f.line for f in report.of("boilerplate_answer")] == [n]
    # Line 15 is a real query of 42 words (the median is 10): long, though not planted.
    assert [f.line for f in report.of("long_example")] == [15, n]
    assert report.stats["lengths"]["unit"] == "tokens" and report.stats["lengths"]["max"] > 400


def test_fix_writes_a_cleaned_copy_and_never_touches_the_input(tmp_path, small):
    # Every 5th row: 8 per intent, enough to cross-validate each label (5 needed).
    train, test = single_line(banking77("train.csv")[::5]), small[1]
    rows = list(train) + [train[0], (train[1][0].lower(), train[1][1]), test[0]]
    src = write_csv(tmp_path / "train.csv", rows)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    report = audit_data(src, test=write_csv(tmp_path / "test.csv", test), columns=COLUMNS)
    with pytest.raises(UsageError, match="never modifies its input"):
        write_fixed(report, src, COLUMNS)
    result = write_fixed(report, tmp_path / "out" / "clean.csv", COLUMNS, labels="relabel", min_confidence=0.5)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    out_rows = [(r["text"], r["category"]) for r in csv.DictReader(open(tmp_path / "out" / "clean.csv"))]
    dropped = {line for lines in result.dropped.values() for line in lines}
    assert {line_of(len(train)), line_of(len(train) + 1), line_of(len(train) + 2)} <= dropped
    assert len(out_rows) == result.kept == len(rows) - len(dropped)
    relabelled = {line: new for line, _, new in result.relabelled}
    assert relabelled, "some suspect above 0.5 is expected among 615 banking77 rows"
    kept_lines = [line_of(i) for i in range(len(rows)) if line_of(i) not in dropped]
    for line, (text, label) in zip(kept_lines, out_rows):
        assert text == rows[line - 2][0]
        assert label == relabelled.get(line, rows[line - 2][1])


def test_fix_relabels_chat_jsonl_answer_only(tmp_path):
    rows = single_line(banking77("train.csv")[::8])
    rows[3] = (rows[3][0], "cash_withdrawal_charge" if rows[3][1] != "cash_withdrawal_charge" else "card_arrival")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                     {"role": "assistant", "content": c}]}) + "\n" for t, c in rows))
    report = audit_data(path)
    result = write_fixed(report, tmp_path / "fixed.jsonl", labels="relabel", min_confidence=0.0)
    out = [json.loads(x) for x in (tmp_path / "fixed.jsonl").read_text().splitlines()]
    by_line = {line: new for line, _, new in result.relabelled}
    assert by_line, "the planted wrong label at line 4 is expected among the suspects"
    for line, obj in enumerate(out, start=1):
        assert obj["messages"][0]["content"] == rows[line - 1][0]
        assert obj["messages"][1]["content"] == by_line.get(line, rows[line - 1][1])


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasketch" else real(name, *a))
    path = write_csv(tmp_path / "t.csv", single_line(banking77("train.csv")[:20]))
    with pytest.raises(UsageError, match=r"pip install 'tunesmith\[audit\]' \(datasketch not installed\)"):
        audit_data(path, columns=COLUMNS)


def test_files_with_the_same_name_are_told_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rows = single_line(banking77("train.csv")[::40])
    test = single_line(banking77("test.csv")[::40])
    train_path = write_csv(tmp_path / "a" / "data.csv", rows + [test[2]])
    test_path = write_csv(tmp_path / "b" / "data.csv", test)
    report = audit_data(train_path, test=test_path, columns=COLUMNS, labels=False)
    (leak,) = [f for f in report.of("leakage") if f.similarity == 1.0]
    assert (leak.file, leak.line, leak.other_file, leak.other_line) == (str(train_path), len(rows) + 2, str(test_path), 4)
    result = write_fixed(report, tmp_path / "clean.csv", COLUMNS)
    assert len(rows) + 2 in result.dropped["leakage"]


def test_token_lengths_equal_rendering_each_example(tmp_path, tiny_tokenizer):
    """The audit's lengths (each message counted once in a batch, plus the template's own
    tokens per sequence of roles) are the lengths of the examples rendered whole."""
    from tunesmith.data.audit import _token_counts, _TokenLengths
    from tunesmith.data.formats import read_data
    from tunesmith.data.render import render_examples

    texts = [t for t, _ in single_line(banking77("train.csv")[::100])]
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "a short answer"}]}
            for t in texts]
    rows += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": t},
                           {"role": "assistant", "content": t[::-1]}, {"role": "user", "content": "And then?"},
                           {"role": "assistant", "content": "Nothing."}]} for t in texts[:5]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_data(path).examples
    assert len(examples) == len(rows)
    # The fast path (the Rust tokenizer's batch call) is the one measured here.
    assert hasattr(tiny_tokenizer.backend_tokenizer, "encode_batch_fast")
    ids = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert _token_counts(tiny_tokenizer, texts) == [len(i) for i in ids]
    assert _TokenLengths(tiny_tokenizer)(examples) == [render_examples(tiny_tokenizer, [ex])[0].full_length
                                                        for ex in examples]


def test_near_index_finds_the_same_pairs_in_every_process(tmp_path):
    """MinHash is seeded and hashes 3-grams by their code points, not Python's per-process
    string hash: another interpreter (another PYTHONHASHSEED) finds the same pairs."""
    import os
    import subprocess

    code = ("import json, sys; from tunesmith.data.near_duplicates import NearIndex, normalize\n"
            "texts = [normalize(t) for t in json.load(sys.stdin)]\n"
            "index = NearIndex(0.8); out = []\n"
            "for text, sig in zip(texts, index.signatures(texts)):\n"
            "    out.append(index.best_match(text, sig)); index.add(text, sig)\n"
            "print(json.dumps(out))\n")
    texts = [t for t, _ in single_line(banking77("train.csv")[::3])]
    texts += [t.upper() + "!" for t in texts[:20]] + [t[:-2] + "x" + t[-1] for t in texts[20:40]]
    runs = [subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                                    "PYTHONPATH": str(REPO / "src")}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1]
    found = json.loads(runs[0])
    # Every upper-cased copy is the same text once normalised: found, at similarity 1.
    first = len(texts) - 40
    assert all(found[first + k] is not None and found[first + k][1] == 1.0 for k in range(20))
    assert sum(m is not None for m in found[first + 20:]) >= 18
