"""tunesmith.jobs."""
