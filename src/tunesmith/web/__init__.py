"""tunesmith.web."""
