"""The cache stage: text embeddings and VAE latents, content-addressed."""
