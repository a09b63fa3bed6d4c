"""PixArt's aspect-ratio bins: the sizes its multi-scale models were trained at.

With resolution binning (diffusers' `use_resolution_binning=True`, its default) a request
is generated at the bin whose ratio (height / width, the tables' keys) is nearest to the
requested one, and the decoded image is scaled (bilinear, to cover) and centre-cropped
back to the requested size. The tables are PixArt's bucket lists (PixArt-alpha and -sigma
`ASPECT_RATIO_*` data, as diffusers also ships them): one per training size, keyed by
the transformer's latent side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ratio -> (height, width) in pixels at 1024 px; the 256 and 512 tables are this one scaled.
_BINS_1024 = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}
# PixArt-Σ-2K's own list (more extreme ratios than 2 x the 1024 table).
_BINS_2048 = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712), "0.32": (1152, 3584),
    "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072), "0.48": (1408, 2944),
    "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432),
    "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792), "1.29": (2304, 1792),
    "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408),
    "2.09": (2944, 1408), "2.4": (3072, 1280), "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152),
    "3.11": (3584, 1152), "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}


def _scaled(table: dict, divisor: int) -> dict:
    return {ratio: (h // divisor, w // divisor) for ratio, (h, w) in table.items()}


# transformer sample_size (latent side of the training size) -> bins; α has no 2048 model.
BINS_BY_SAMPLE_SIZE = {32: _scaled(_BINS_1024, 4), 64: _scaled(_BINS_1024, 2), 128: _BINS_1024}


def bins_for(sample_size: int, pixart_version: str) -> dict | None:
    """The bin table of a model trained at `sample_size` (latent side), or None if PixArt has none."""
    if sample_size == 256 and pixart_version == "sigma":
        return _BINS_2048
    return BINS_BY_SAMPLE_SIZE.get(sample_size)


def nearest_bin(height: int, width: int, bins: dict) -> tuple[int, int]:
    """The (height, width) of the bin whose ratio is nearest height / width (first on ties)."""
    ratio = height / width
    key = min(bins, key=lambda r: abs(float(r) - ratio))
    return bins[key]


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, C, height, width]: scaled bilinearly until it covers the target,
    then centre-cropped (the inverse of snapping a request to its bin)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[:, :, top:top + height, left:left + width]
