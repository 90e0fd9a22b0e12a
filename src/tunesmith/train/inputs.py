"""A training file's items for the run's method: rendered examples for supervised methods
(lora, full, qlora), rendered preference pairs for dpo. The one place that picks between
train.data and train.preference, which keeps those two free of each other.

    python -c "from tunesmith.train.inputs import load_training_items; help(load_training_items)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.data.formats import ColumnMapping
from tunesmith.train import data as td
from tunesmith.train import preference


def load_training_items(tokenizer: Any, path: Path, cfg: Any) -> tuple[list, td.DataStats]:
    """The rendered training items of a file: TokenizedExamples, or for --method dpo
    TokenizedPairs (see train.preference), with their stats."""
    if cfg.method == "dpo":
        return preference.render_pairs(tokenizer, preference.load_pairs(path, cfg.format), cfg.max_seq_len, str(path))
    columns = ColumnMapping(cfg.input_column, cfg.output_column, cfg.system)
    return td.render_and_filter(tokenizer, td.load_examples(path, cfg.format, columns), cfg.max_seq_len, str(path))
