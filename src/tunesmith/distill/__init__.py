"""Distillation: a teacher model answers prompts; the answers become training data."""
