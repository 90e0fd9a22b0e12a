"""tunesmith.evaluate."""
