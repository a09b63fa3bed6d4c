"""What `dite generate` writes: file names, image formats and their metadata, prompt files,
random seeds, re-running an image from its metadata. Nothing here builds or runs a model."""
