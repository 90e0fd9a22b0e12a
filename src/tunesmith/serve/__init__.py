"""tunesmith.serve."""
