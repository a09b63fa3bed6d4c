"""Prompts / labels -> images: one call skeleton (base.Pipeline) and each family's conditioning
and latent shape."""
