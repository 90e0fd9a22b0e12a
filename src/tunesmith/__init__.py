"""tunesmith: self-hosted fine-tuning for open-weight language models.

    tunesmith validate data.jsonl          # check data through the model's chat template
    tunesmith train --data data.jsonl --out runs/first
"""

__version__ = "0.1.0"
