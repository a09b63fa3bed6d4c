"""Running models in less memory: text encoders released after encoding, tiled VAE decoding,
fp8 weight storage, offloading between a storage and an execution device."""
