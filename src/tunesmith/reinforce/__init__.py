"""Reinforcement fine-tuning: GRPO on a LoRA adapter, answers sampled by the one engine and scored by a grader."""
