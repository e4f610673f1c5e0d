"""The train stage: the LoRA training loop and what it needs to survive preemption."""
