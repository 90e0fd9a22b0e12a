"""Graders: score a model's answer (a sample) against a dataset row (an item), in OpenAI's
shapes: string_check, text_similarity, python, score_model, label_model and multi.

One library for the graders API (`serve/graders_api.py`), `tunesmith grade`, `tunesmith eval
--grader` and, later, reinforcement fine-tuning.

    python -c "from tunesmith.graders.run import run_grader; from tunesmith.graders.types import parse_grader; \
print(run_grader(parse_grader({'type': 'string_check', 'name': 'g', 'input': '{{sample.output_text}}', \
'reference': '{{item.label}}', 'operation': 'eq'}), 'card_arrival', {'label': 'card_arrival'}).reward)"
"""
