"""Kolors and the scorer models: loading from disk, tiny random versions for CPU, downloads, folder checks, fingerprints."""
