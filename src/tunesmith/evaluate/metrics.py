"""Score predictions against reference answers: label, exact, json, rouge (ROUGE-L + chrF),
tool_call (function names and arguments by value).

Pure Python, no downloads. Every scorer returns a `Scores`: a flat dict of headline
numbers, per-example correctness (0/1) and a per-example score in [0, 1] (used to rank
the worst examples), plus extras (confusion matrix, per-class P/R) for the report.

    python -c "from tunesmith.evaluate.metrics import score; print(score(['a','b'], ['a','c']).summary)"
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunesmith.data.tool_syntax import HERMES, LLAMA3_JSON, parse_calls
from tunesmith.errors import UsageError

METRICS = ("auto", "label", "exact", "json", "rouge", "tool_call")
SCORE_NAMES = {
    "label": ("accuracy", "macro_f1", "invalid_label_share"),
    "exact": ("exact_match",),
    "json": ("exact_match", "parse_rate", "exact_keys_rate", "field_accuracy"),
    "tool_call": ("exact_call_rate", "parse_rate", "name_accuracy"),
    "rouge": ("rouge_l", "chrf", "exact_match"),
}
"""The headline scores each metric reports (an evaluation's `scores`), by metric."""
INVALID_LABEL = "invalid label"

# `auto` calls references a label set when few distinct short one-line answers repeat.
MAX_LABELS = 200
MAX_LABEL_CHARS = 64


@dataclass
class Scores:
    metric: str
    summary: dict[str, float]
    """Headline numbers, e.g. {"accuracy": 0.8, "macro_f1": 0.77}; the first is the main one."""
    correct: list[bool]
    per_example: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> tuple[str, float]:
        name = next(iter(self.summary))
        return name, self.summary[name]


def normalize(text: str) -> str:
    """Collapse runs of whitespace and strip the ends."""
    return " ".join(text.split())


def pick_metric(references: Sequence[str]) -> str:
    """The metric `auto` uses: json if every reference is a JSON object or array, label if
    the references are a small repeated set of short one-liners, exact for short answers,
    rouge otherwise."""
    refs = [normalize(r) for r in references]
    if not refs:
        return "exact"
    if all(parse_calls(HERMES, r)[1] for r in references):  # references write calls in the default syntax
        return "tool_call"
    if all(isinstance(_parse_json(r)[1], (dict, list)) for r in refs):
        return "json"
    distinct = set(refs)
    short = all(len(r) <= MAX_LABEL_CHARS for r in refs)
    if short and len(distinct) <= MAX_LABELS and len(distinct) <= max(2, len(refs) // 2):
        return "label"
    if all(len(r.split()) <= 3 for r in refs):
        return "exact"
    return "rouge"


def score(
    references: Sequence[str],
    predictions: Sequence[str],
    metric: str = "auto",
    labels: Sequence[str] | None = None,
) -> Scores:
    """Score predictions with `metric` (auto picks from the references).

    labels: the valid label set for `label` (default: the distinct references)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if metric not in METRICS:
        raise UsageError(f"unknown --metric '{metric}'; accepted: {', '.join(METRICS)}")
    if metric == "auto":
        metric = pick_metric(references)
    if metric == "label":
        return label_scores(references, predictions, labels)
    if metric == "exact":
        return exact_scores(references, predictions)
    if metric == "json":
        return json_scores(references, predictions)
    if metric == "tool_call":
        return tool_call_scores(references, predictions)
    return rouge_scores(references, predictions)


# ----------------------------------------------------------------------------- label


def match_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a prediction names: exact after whitespace normalisation, else the one
    label equal ignoring case and surrounding quotes/full stop; None when outside the set."""
    pred = normalize(prediction)
    if pred in labels:
        return pred
    loose = pred.strip("\"'`.").lower()
    hits = [lab for lab in labels if lab.lower() == loose]
    return hits[0] if len(hits) == 1 else None


def label_scores(
    references: Sequence[str], predictions: Sequence[str], labels: Sequence[str] | None = None
) -> Scores:
    refs = [normalize(r) for r in references]
    label_set = sorted({normalize(lab) for lab in labels or ()} | set(refs))
    mapped = [match_label(p, label_set) for p in predictions]
    correct = [m is not None and m == r for m, r in zip(mapped, refs)]
    invalid = Counter(normalize(p)[:80] for p, m in zip(predictions, mapped) if m is None)
    n = len(refs)

    # Confusion matrix over the labels that occur (references or valid predictions), plus
    # one column for predictions outside the label set.
    shown = sorted(set(refs) | {m for m in mapped if m is not None})
    index = {lab: i for i, lab in enumerate(shown)}
    cols = shown + [INVALID_LABEL]
    matrix = [[0] * len(cols) for _ in shown]
    for r, m in zip(refs, mapped):
        matrix[index[r]][index[m] if m is not None else len(shown)] += 1

    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for lab in shown:
        tp = sum(1 for r, m in zip(refs, mapped) if r == lab and m == lab)
        predicted = sum(1 for m in mapped if m == lab)
        support = sum(1 for r in refs if r == lab)
        p = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * p * rec / (p + rec) if p + rec else 0.0
        per_class[lab] = {"precision": p, "recall": rec, "f1": f1, "support": support}
        if support:
            f1s.append(f1)
    summary = {
        "accuracy": sum(correct) / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "invalid_label_share": sum(invalid.values()) / n if n else 0.0,
    }
    extra = {
        "labels": label_set,
        "per_class": per_class,
        "confusion": {"labels": shown, "columns": cols, "matrix": matrix},
        "invalid_labels": dict(invalid.most_common(20)),
    }
    return Scores("label", summary, correct, [float(c) for c in correct], extra)


# ----------------------------------------------------------------------------- exact


def exact_scores(references: Sequence[str], predictions: Sequence[str]) -> Scores:
    correct = [normalize(r) == normalize(p) for r, p in zip(references, predictions)]
    n = len(correct)
    return Scores("exact", {"exact_match": sum(correct) / n if n else 0.0}, correct, [float(c) for c in correct])


# ----------------------------------------------------------------------------- json

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _parse_json(text: str) -> tuple[bool, Any]:
    text = text.strip()
    fenced = _FENCE.match(text)  # models often wrap JSON in a markdown fence
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_scores(references: Sequence[str], predictions: Sequence[str]) -> Scores:
    """parse_rate: outputs that parse; exact_keys_rate: objects with exactly the reference's
    keys; field_accuracy: reference fields whose value the output matches, over all fields."""
    parsed = correct_keys = fields_total = fields_right = 0
    correct: list[bool] = []
    per_example: list[float] = []
    for ref_text, pred_text in zip(references, predictions):
        ok_ref, ref = _parse_json(ref_text)
        ok, pred = _parse_json(pred_text)
        parsed += ok
        ref_fields = ref if isinstance(ref, dict) else {"$": ref}
        pred_fields = pred if isinstance(pred, dict) else ({"$": pred} if ok and not isinstance(ref, dict) else {})
        if ok and isinstance(ref, dict) and isinstance(pred, dict) and set(ref) == set(pred):
            correct_keys += 1
        right = sum(1 for k, v in ref_fields.items() if k in pred_fields and pred_fields[k] == v)
        fields_total += len(ref_fields)
        fields_right += right
        correct.append(ok and ok_ref and pred == ref)
        per_example.append(right / len(ref_fields) if ref_fields else float(ok and pred == ref))
    n = len(correct)
    summary = {
        "exact_match": sum(correct) / n if n else 0.0,
        "parse_rate": parsed / n if n else 0.0,
        "exact_keys_rate": correct_keys / n if n else 0.0,
        "field_accuracy": fields_right / fields_total if fields_total else 0.0,
    }
    return Scores("json", summary, correct, per_example)


# ----------------------------------------------------------------------------- tool calls


def _calls(text: str) -> list[str] | None:
    """An answer's calls as sorted canonical (name, arguments) texts; None when it has none
    that parse. Arguments compare by value, as BFCL's AST checker does: key order, spacing
    and 1 against 1.0 do not matter."""
    calls = _read_calls(text)
    if not calls:
        return None
    return sorted(json.dumps([name, _canonical(args)], sort_keys=True) for name, args in calls)


def _read_calls(text: str) -> list[tuple[str, Any]]:
    """An answer's calls in either syntax a model may be trained with: the default (Hermes'
    tags, which references are written in) or Llama 3.x's bare JSON object."""
    return parse_calls(HERMES, text)[1] or parse_calls(LLAMA3_JSON, text)[1]


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def tool_call_scores(references: Sequence[str], predictions: Sequence[str]) -> Scores:
    """exact_call_rate: answers whose calls (parallel ones in any order) equal the reference's,
    names and arguments by value; parse_rate: answers holding calls that parse; name_accuracy:
    answers calling exactly the reference's functions, whatever the arguments."""
    correct, per_example = [], []
    parsed = names_right = 0
    for ref_text, pred_text in zip(references, predictions):
        ref, pred = _calls(ref_text), _calls(pred_text)
        parsed += pred is not None
        same_names = pred is not None and ref is not None and \
            sorted(json.loads(c)[0] for c in pred) == sorted(json.loads(c)[0] for c in ref)
        names_right += same_names
        ok = ref is not None and pred == ref
        correct.append(ok)
        per_example.append(1.0 if ok else 0.5 if same_names else 0.0)
    n = len(correct)
    summary = {"exact_call_rate": sum(correct) / n if n else 0.0, "parse_rate": parsed / n if n else 0.0,
               "name_accuracy": names_right / n if n else 0.0}
    return Scores("tool_call", summary, correct, per_example)


# ----------------------------------------------------------------------------- rouge / chrF

_WORD = re.compile(r"\w+", re.UNICODE)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (Lin 2004, beta = 1)."""
    ref = _WORD.findall(reference.lower())
    pred = _WORD.findall(prediction.lower())
    lcs = _lcs(ref, pred)
    if not lcs:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


CHRF_ORDER = 6
CHRF_BETA = 2.0


def _chrf_stats(reference: str, prediction: str) -> list[tuple[int, int, int]]:
    """Per n-gram order: (matches, prediction n-grams, reference n-grams), whitespace
    removed as in sacrebleu's chrF."""
    ref = "".join(reference.split())
    pred = "".join(prediction.split())
    stats = []
    for n in range(1, CHRF_ORDER + 1):
        rc = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        pc = Counter(pred[i:i + n] for i in range(len(pred) - n + 1))
        stats.append((sum((rc & pc).values()), sum(pc.values()), sum(rc.values())))
    return stats


def _chrf_from_stats(stats: Sequence[tuple[int, int, int]]) -> float:
    precisions, recalls = [], []
    for match, hyp, ref in stats:
        if hyp and ref:
            precisions.append(match / hyp)
            recalls.append(match / ref)
    if not precisions:
        return 0.0
    p = sum(precisions) / len(precisions)
    r = sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = CHRF_BETA**2
    return (1 + b2) * p * r / (b2 * p + r)


def chrf(reference: str, prediction: str) -> float:
    """Sentence chrF (character 6-grams, beta 2) in [0, 1]."""
    return _chrf_from_stats(_chrf_stats(reference, prediction))


def rouge_scores(references: Sequence[str], predictions: Sequence[str]) -> Scores:
    """rouge_l: mean sentence ROUGE-L F1; chrf: corpus chrF (statistics summed over the
    set, as sacrebleu does), both in [0, 1]."""
    rl = [rouge_l(r, p) for r, p in zip(references, predictions)]
    totals = [[0, 0, 0] for _ in range(CHRF_ORDER)]
    for r, p in zip(references, predictions):
        for k, s in enumerate(_chrf_stats(r, p)):
            for j in range(3):
                totals[k][j] += s[j]
    correct = [normalize(r) == normalize(p) for r, p in zip(references, predictions)]
    n = len(rl)
    summary = {
        "rouge_l": sum(rl) / n if n else 0.0,
        "chrf": _chrf_from_stats([tuple(t) for t in totals]),
        "exact_match": sum(correct) / n if n else 0.0,
    }
    return Scores("rouge", summary, correct, rl)
