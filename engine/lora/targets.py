"""Where a LoRA's adapted layer sits in dite's modules: through the same key maps the loaders
read base weights with (models/mmdit.py, models/pixart.py), in both the diffusers and the
original layouts. A checkpoint key may be one part of a dite parameter (diffusers' to_q, to_k,
to_v are one fused qkv here); `Target.index` says which part."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.lora.formats import LoraError, LoraFile
from dite.models.checkpoint import KeyMap, Source


@dataclass(frozen=True)
class Target:
    param: str  # dite's parameter name
    source: Source  # how the parameter is built from checkpoint keys (unbuild/build)
    index: int  # which of source.keys this module's weight is


def _keymaps(pipe) -> list[KeyMap]:
    cfg = pipe.transformer.config
    if pipe.family == "sd3":
        from dite.models import mmdit

        return [mmdit.keymap(cfg, layout)[0] for layout in ("diffusers", "original")]
    if pipe.family == "pixart":
        from dite.models import pixart

        return [pixart.keymap(cfg, layout)[0] for layout in ("diffusers", "original")]
    raise LoraError(f"LoRAs are merged into SD3 and PixArt transformers; this is a {pipe.family} pipeline")


def module_targets(pipe) -> dict[str, Target]:
    """Checkpoint module name (without `.weight`) -> Target, for every linear weight."""
    targets: dict[str, Target] = {}
    for keymap in _keymaps(pipe):
        for name, source in keymap.items():
            if not name.endswith(".weight") or source.piece is not None:
                continue
            for index, key in enumerate(source.keys):
                if key.endswith(".weight"):
                    targets.setdefault(key.removesuffix(".weight"), Target(name, source, index))
    return targets


def resolve(pipe, lora: LoraFile) -> dict[str, Target]:
    """Each of the file's modules -> its Target, with every shape checked; nothing is changed."""
    targets = module_targets(pipe)
    if lora.style == "kohya":
        targets = {module.replace(".", "_"): t for module, t in targets.items()}
    unknown = sorted(set(lora.pairs) - set(targets))
    if unknown:
        raise LoraError(f"{lora.path.name} adapts {len(unknown)} modules this {pipe.family} transformer does not "
                        f"have (such as {unknown[:3]}); is it a LoRA for another model?")
    params = dict(pipe.transformer.named_parameters())
    found = {}
    for module, pair in lora.pairs.items():
        target = targets[module]
        with torch.no_grad():
            part = target.source.unbuild(params[target.param].detach())[target.index]
        want = (pair.up.shape[0], pair.down.shape[1])
        if tuple(part.shape) != want:
            raise LoraError(f"{lora.path.name}: {module} is {tuple(part.shape)} in this model but the LoRA's "
                            f"up @ down is {want}; is it a LoRA for another model?")
        found[module] = target
    return found
