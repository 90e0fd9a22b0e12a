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

Every metric's time grows with the texts, and rouge_l's with their product (it fills a table of
words x words in pure Python: 4,000 words against 4,000 take 8 s, 400,000 a day). Texts over
MAX_CHARS, or rouge_l past MAX_ROUGE_L_CELLS, are a `TextTooLong` error, never silently the
score of a shortened text.

    python -c "from tunesmith.graders.similarity import similarity; print(similarity('rouge_l', 'a cat sat', 'the cat sat'))"
"""

from __future__ import annotations

import re

from tunesmith.errors import UsageError

WORD = re.compile(r"\w+|[^\w\s]")
ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
"""rouge-score's tokens (of the lower-cased text)."""
MAX_CHARS = 100_000
"""Longest answer or reference scored (about 25,000 tokens; an RFT answer is at most 4,096)."""
MAX_ROUGE_L_CELLS = 4_000_000
"""Tokens of the answer x tokens of the reference that rouge_l compares (about 2 s here): 2,000
against 2,000, or a 4,096-token answer against a reference of about a thousand words."""


class TextTooLong(UsageError):
    """The texts are too long for the metric to score in bounded time."""


class _NoSynonyms:
    """Stands in for nltk's WordNet in METEOR: no synonym matches (no corpus download)."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def similarity(metric: str, text: str, reference: str) -> float:
    """`text` scored against `reference` with `metric`, from 0 to 1."""
    longest = max(len(text), len(reference))
    if longest > MAX_CHARS:
        raise TextTooLong(f"text_similarity scores texts of at most {MAX_CHARS:,} characters; got {longest:,}")
    try:
        if metric == "fuzzy_match":
            from rapidfuzz import fuzz, utils

            return fuzz.WRatio(text, reference, processor=utils.default_process) / 100.0
        if metric in ("bleu", "gleu", "meteor"):
            return _nltk_score(metric, _words(text), _words(reference))
        if metric.startswith("rouge_"):
            from rouge_score import rouge_scorer

            if metric == "rouge_l":
                cells = len(ROUGE_TOKEN.findall(text.lower())) * len(ROUGE_TOKEN.findall(reference.lower()))
                if cells > MAX_ROUGE_L_CELLS:
                    raise TextTooLong(f"rouge_l compares at most {MAX_ROUGE_L_CELLS:,} word pairs; the answer x "
                                      f"the reference are {cells:,}; use rouge_2 or fuzzy_match for texts this long")

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
