"""Numbers derived from a data set that several stages share."""

from __future__ import annotations

import math

# The rule hosted fine-tuning APIs use for `n_epochs: "auto"`: aim for between 100 and
# 25,000 trained examples in total, three epochs when that already holds.
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_AUTO_EPOCHS = 25


def auto_epochs(n_examples: int) -> int:
    """Epochs picked for `--epochs auto`: more for small sets, fewer for large ones."""
    if n_examples <= 0:
        return DEFAULT_EPOCHS
    if n_examples * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return DEFAULT_EPOCHS
