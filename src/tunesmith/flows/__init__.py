"""Workflows that chain stages (data -> train -> evaluate): the only library code that does."""
