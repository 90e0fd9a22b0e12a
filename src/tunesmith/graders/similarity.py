"""Text similarity scores from 0 to 1, with the libraries OpenAI's graders guide names:
rapidfuzz for fuzzy_match, nltk for bleu, gleu and meteor, rouge-score for rouge_1..rouge_l
(the `graders` extra: pip install 'tunesmith[graders]').

- fuzzy_match: rapidfuzz `fuzz.WRatio` after `utils.default_process` (lower case, no
  punctuation), / 100.
- bleu, gleu: nltk's sentence scores on word tokens; bleu smoothed (method1) so a short
  answer without a 4-gram match is not 0.
- meteor: nltk's, with exact and stem matches only: WordNet synonyms need a corpus download,
  which tunesmith never makes.
- rouge_N, rouge_l: rouge-score's F-measure, with stemming.

    python -c "from tunesmith.graders.similarity import similarity; print(similarity('rouge_l', 'a cat sat', 'the cat sat'))"
"""

from __future__ import annotations

import re

from tunesmith.errors import UsageError

WORD = re.compile(r"\w+|[^\w\s]")


class _NoSynonyms:
    """Stands in for nltk's WordNet in METEOR: no synonym matches (no corpus download)."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def similarity(metric: str, text: str, reference: str) -> float:
    """`text` scored against `reference` with `metric`, from 0 to 1."""
    try:
        if metric == "fuzzy_match":
            from rapidfuzz import fuzz, utils

            return fuzz.WRatio(text, reference, processor=utils.default_process) / 100.0
        if metric in ("bleu", "gleu", "meteor"):
            return _nltk_score(metric, _words(text), _words(reference))
        if metric.startswith("rouge_"):
            from rouge_score import rouge_scorer

            key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
            return rouge_scorer.RougeScorer([key], use_stemmer=True).score(reference, text)[key].fmeasure
    except ImportError as exc:
        raise UsageError(f"text_similarity '{metric}' needs {exc.name}: pip install 'tunesmith[graders]'") from None
    raise UsageError(f"unknown evaluation_metric '{metric}'")


def _nltk_score(metric: str, hypothesis: list[str], reference: list[str]) -> float:
    if not hypothesis or not reference:
        return float(hypothesis == reference)
    if metric == "bleu":
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return float(sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method1))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference], hypothesis))
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([reference], hypothesis, wordnet=_NoSynonyms()))
