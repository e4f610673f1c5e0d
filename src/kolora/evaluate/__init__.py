"""The evaluate stage: CLIP and aesthetic scores of the tiles, LoRA vs base."""
