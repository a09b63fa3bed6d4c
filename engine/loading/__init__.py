"""Source -> Pipeline: `load()`, the hub, weight readers, per-family loaders, the SD3 single-file
assembler, VAE and text-encoder loading. Importing this package imports none of them."""
