"""The demo models shipped with dite as package data: `sd3/` (text-to-image, SD3 architecture)
and `dit/` (class-to-image, DiT architecture), diffusers folders trained by
tools/train_demo.py on synthetic scenes. Load them with `dite.engine.load("demo-sd3")` /
`load("demo-dit")`; models/demo/README.md is their model card."""
