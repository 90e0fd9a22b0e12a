"""The one generation engine: local continuous batching, sampling, constraints, remote clients."""
