"""Which cheap classifier should score suspect labels: TF-IDF + linear SVM (what `tunesmith
audit` uses) or the base model's own embeddings + logistic regression? Both are scored the
same way on the bundled banking77 copy with 5% of its labels flipped at random: 5-fold
out-of-fold probabilities, cleanlab's `find_label_issues(filter_by="both")`, recall and
precision against the flipped rows, and the time each takes here.

    OMP_NUM_THREADS=2 python bench/audit_label_model.py
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from cleanlab.filter import find_label_issues
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from tunesmith.data.label_issues import find_suspect_labels
from tunesmith.models.registry import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parents[1]


def flipped_copy(seed: int = 0):
    with open(REPO / "data" / "banking77" / "train.csv", newline="", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh)]
    labels = sorted({c for _, c in rows})
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(rows)), round(0.05 * len(rows))))
    noisy = [rng.choice([c for c in labels if c != y]) if i in flipped else y for i, (_, y) in enumerate(rows)]
    return [t for t, _ in rows], noisy, flipped, labels


def score(found: set[int], flipped: set[int]) -> dict:
    hit = len(found & flipped)
    return {"flagged": len(found), "recall": round(hit / len(flipped), 3), "precision": round(hit / max(1, len(found)), 3)}


@torch.no_grad()
def embed(texts: list[str], batch: int = 64) -> np.ndarray:
    """Mean of the last hidden layer over each text's tokens (the text alone, no template)."""
    ref = resolve_model(DEFAULT_MODEL)
    tok, model = load_tokenizer(ref), load_model(ref, dtype=torch.bfloat16)
    tok.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for i in range(0, len(texts), batch):
        rows = order[i:i + batch]
        enc = tok([texts[r] for r in rows], return_tensors="pt", padding=True)
        hidden = model.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out[rows] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return out


def main() -> None:
    texts, noisy, flipped, labels = flipped_copy()
    results = {}
    start = time.perf_counter()
    suspects, info = find_suspect_labels(texts, noisy)
    results["tfidf_linear_svm"] = {**score({s.index for s in suspects}, flipped),
                                   "out_of_fold_accuracy": info["out_of_fold_accuracy"],
                                   "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(results), flush=True)
    start = time.perf_counter()
    x = embed(texts)
    embed_s = time.perf_counter() - start
    y = np.array([labels.index(c) for c in noisy])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    probs = cross_val_predict(LogisticRegression(C=0.5, max_iter=500), x, y,
                              cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    issues = set(np.flatnonzero(find_label_issues(y, probs, filter_by="both")).tolist())
    results["smollm2_embeddings_logistic_regression"] = {
        **score(issues, flipped), "out_of_fold_accuracy": round(float((probs.argmax(1) == y).mean()), 4),
        "seconds": round(time.perf_counter() - start, 1), "embedding_seconds": round(embed_s, 1)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
