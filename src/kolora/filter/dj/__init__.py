"""Data-Juicer adapters for the filter stage."""
