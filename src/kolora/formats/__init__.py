"""LoRA files and the formats other tools load, UNet module names, picture checks."""
