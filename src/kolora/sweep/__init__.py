"""Sweeps: variants of one config, their comparison and ranking."""
