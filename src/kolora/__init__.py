"""kolora: Kolors LoRA training on Slurm clusters."""

__version__ = "0.1.0"
