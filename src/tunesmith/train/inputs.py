"""A training file's items for the run's method: rendered examples for supervised methods
(lora, full, qlora), rendered preference pairs for dpo, rendered prompts (with the grader's
item) for reinforcement. The one place that picks between
train.data and train.preference, which keeps those two free of each other.

    python -c "from tunesmith.train.inputs import load_training_items; help(load_training_items)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.data.formats import ColumnMapping
from tunesmith.data.prompts import read_prompt_rows, render_prompt_rows
from tunesmith.train import data as td
from tunesmith.train import preference


def load_training_items(tokenizer: Any, path: Path, cfg: Any) -> tuple[list, td.DataStats]:
    """The rendered training items of a file: TokenizedExamples, or for --method dpo
    TokenizedPairs (see train.preference), with their stats."""
    if cfg.method == "reinforcement":
        return load_prompts(tokenizer, path, cfg)
    if cfg.method == "dpo":
        return preference.render_pairs(tokenizer, preference.load_pairs(path, cfg.format), cfg.max_seq_len, str(path))
    columns = ColumnMapping(cfg.input_column, cfg.output_column, cfg.system)
    return td.render_and_filter(tokenizer, td.load_examples(path, cfg.format, columns), cfg.max_seq_len, str(path))


def load_prompts(tokenizer: Any, path: Path, cfg: Any) -> tuple[list, td.DataStats]:
    """Reinforcement: the prompts of a file (data.prompts), each short enough that a whole
    answer of --max-completion-tokens fits within --max-seq-len after it."""
    rows, problems = read_prompt_rows(path)
    td.raise_for_errors(path, problems)
    room = cfg.max_seq_len - cfg.max_completion_tokens
    prompts, dropped = render_prompt_rows(tokenizer, rows, room)
    stats = td.DataStats(examples=len(prompts), dropped_no_trained_tokens=dropped,
                         tokens=sum(len(p) for p in prompts), longest=max((len(p) for p in prompts), default=0))
    td.check_kept(stats, len(rows), cfg.max_seq_len, str(path), unit="prompts")
    return prompts, stats
