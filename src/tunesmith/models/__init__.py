"""Finding, pulling and loading base models (registry names, HF directories, GGUF files)."""
