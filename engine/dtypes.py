"""Every dtype name dite reads or writes, in one table each; a leaf, like engine/errors.py.

The tables are plain strings (torch attribute names), so the CLI's parser reads them
without importing torch; the functions give the torch dtypes, built on first use.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The precisions load(), convert and every `--dtype` take, by short name.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The other spellings load() takes for them.
LONG_NAMES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
# A safetensors header's dtype names ("F16"), by torch dtype.
SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                     "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                     "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@cache
def precisions(long_names: bool = False) -> dict[str, torch.dtype]:
    """{"fp32": torch.float32, ...}; with `long_names` also "float32", "half", ..."""
    import torch

    names = dict(PRECISIONS)
    if long_names:
        names.update({long: PRECISIONS[short] for long, short in LONG_NAMES.items()})
    return {name: getattr(torch, attr) for name, attr in names.items()}


@cache
def safetensors_names() -> dict[torch.dtype, str]:
    """{torch.float16: "F16", ...}: what a safetensors header calls each dtype dite writes."""
    import torch

    return {getattr(torch, attr): name for attr, name in SAFETENSORS_NAMES.items()}


@cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """{"F16": torch.float16, ...}: the dtypes of the safetensors header names dite reads."""
    return {name: dtype for dtype, name in safetensors_names().items()}
