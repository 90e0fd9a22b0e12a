"""Suspect labels in classification-like data: out-of-fold probabilities from a cheap text
classifier, ranked by cleanlab.

The classifier is TF-IDF (word 1-2 grams, and character 2-4 grams within words on files
up to 20,000 rows; above that, only words and pairs seen in at least two rows) with a
linear SVM, 5-fold cross-validated so that every row is scored by a model that never saw
it; its decision values become probabilities through a softmax whose one temperature is
fitted to the out-of-fold labels (a logistic regression gives the same ranking at 3 to 6
times the time). cleanlab's `find_label_issues` (confident learning, `filter_by="both"`)
decides which rows are issues; each gets a confidence, 1 minus cleanlab's label-quality
score (the out-of-fold probability of the given label), and the label the classifier
suggests instead.
docs/data.md says why this classifier and not the base model's embeddings (measured).

    python -c "from tunesmith.data.label_issues import find_suspect_labels as f; \
print(f(['top up failed']*6 + ['card lost']*6, ['a']*5 + ['b'] + ['b']*6))"
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tunesmith.data.near_duplicates import INSTALL_HINT
from tunesmith.errors import UsageError

FOLDS = 5
CHAR_FEATURES_MAX_ROWS = 20_000
"""Character n-grams besides words up to this many rows. They lift banking77's planted-flip
precision from 0.44 to 0.61 (docs/benchmarks.md), but cost 5x the time, which on 100,000
rows is minutes."""
FIT_MAX_ROWS = 10_000
"""Each fold's model trains on at most this many rows (a random sample of the other folds),
so that a large file costs five bounded fits; every row is still scored out of fold."""
MIN_PER_LABEL = FOLDS
"""Rows of a label needed to cross-validate it; rarer labels are left out (reported as rare)."""


@dataclass(frozen=True)
class SuspectLabel:
    index: int
    """Position in the texts given."""
    given: str
    suggested: str
    confidence: float
    """1 - P(given label) out of fold: how sure the check is that the label is wrong."""


def find_suspect_labels(texts: list[str], labels: list[str], seed: int = 0) -> tuple[list[SuspectLabel], dict]:
    """Rows whose label looks wrong, most confident first, and the classifier's numbers
    (out-of-fold accuracy, rows and labels used) so a reader can judge the ranking."""
    try:
        import numpy as np
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
        from sklearn.feature_extraction.text import TfidfVectorizer
        from scipy.optimize import minimize_scalar
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import FeatureUnion
        from sklearn.svm import LinearSVC
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UsageError(INSTALL_HINT) from exc

    counts = Counter(labels)
    kept = [i for i, y in enumerate(labels) if counts[y] >= MIN_PER_LABEL]
    names = sorted({labels[i] for i in kept})
    info = {"classifier": "tfidf+linear_svm", "folds": FOLDS, "rows": len(kept), "labels": len(names)}
    if len(names) < 2:
        return [], {**info, "skipped": "fewer than 2 labels with at least 5 rows each"}
    code = {y: k for k, y in enumerate(names)}
    y = np.array([code[labels[i]] for i in kept])
    x = [texts[i] for i in kept]
    if len(kept) <= CHAR_FEATURES_MAX_ROWS:
        features = FeatureUnion([
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float32)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2,
                                      dtype=np.float32))])
    else:
        # A word or pair seen in one row only cannot inform another row's out-of-fold
        # score; it only lets a fold's model memorise its own rows. Dropping them took
        # 100,000 rows' vocabulary from 630,000 to 113,000 and the five fits from 18 s
        # to 7 s, with suspect-label recall and precision slightly up (docs/benchmarks.md).
        # (On banking77's 3,425 rows the same cut cost recall: the small path keeps them.)
        features = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    info["features"] = "words+chars" if len(kept) <= CHAR_FEATURES_MAX_ROWS else "words"
    # Fitting the vectoriser on all rows lets a fold see the other folds' vocabulary (not
    # their labels): a small optimism in exchange for one vectorisation instead of five.
    matrix = features.fit_transform(x)
    rng = np.random.default_rng(seed)
    scores = np.zeros((len(y), len(names)), dtype=np.float64)
    for train_rows, held_out in StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed).split(matrix, y):
        if len(train_rows) > FIT_MAX_ROWS:
            train_rows = rng.choice(train_rows, FIT_MAX_ROWS, replace=False)
        model = LinearSVC(C=1.0).fit(matrix[train_rows], y[train_rows])
        decision = model.decision_function(matrix[held_out])
        if decision.ndim == 1:  # two labels: one decision value, for the second label
            decision = np.stack([-decision / 2, decision / 2], axis=1)
        # A label missing from a sampled fold scores below every label the model knows.
        fold = np.full((len(held_out), len(names)), decision.min() - 1.0)
        fold[:, model.classes_] = decision
        scores[held_out] = fold
    info["fit_rows_per_fold"] = min(FIT_MAX_ROWS, len(y) - len(y) // FOLDS)

    def softmax(t: float):
        z = scores * t
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    rows = np.arange(len(y))
    fit = minimize_scalar(lambda t: -np.log(softmax(t)[rows, y] + 1e-12).mean(), bounds=(0.1, 100), method="bounded")
    probs = softmax(fit.x)
    info["out_of_fold_accuracy"] = round(float((probs.argmax(1) == y).mean()), 4)
    issues = find_label_issues(y, probs, filter_by="both")
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    out = [
        SuspectLabel(index=kept[i], given=names[y[i]], suggested=names[int(probs[i].argmax())],
                     confidence=round(float(1 - quality[i]), 4))
        for i in np.flatnonzero(issues)
    ]
    out.sort(key=lambda s: -s.confidence)
    return out, info
