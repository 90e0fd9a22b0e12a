"""tunesmith: self-hosted fine-tuning for open-weight language models.

    tunesmith validate data.jsonl          # check data through the model's chat template
    tunesmith train --data data.jsonl --out runs/first
"""

__version__ = "0.1.0"

import warnings as _warnings

# peft 0.21 reads `model.is_gradient_checkpointing` whenever it wraps a model, which
# transformers 5.24 deprecates with a FutureWarning on every train, eval, serve and export;
# the user can do nothing about it, so it is silenced here, for that one message only.
_warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
