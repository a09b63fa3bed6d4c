"""Where a LoRA's adapted layer sits in dite's modules: through the same key maps the loaders
read base weights with (models/mmdit.py, models/pixart.py, models/clip.py, models/t5.py), in
the layouts LoRA files name modules by. A checkpoint key may be one part of a dite parameter
(diffusers' to_q, to_k, to_v are one fused qkv here); `Target.index` says which part.

Components (formats.TRANSFORMER, formats.TEXT_ENCODERS) are the denoiser and, for SD3, CLIP-L
(`pipe.text.clip_l`), CLIP-G (`pipe.text.clip_g`) and T5 (`pipe.text.t5`), named in
transformers' layout: `text_model.encoder.layers.N.self_attn.q_proj` (also without the
`text_model.` wrapper, which some savers drop) and `encoder.block.N.layer.0.SelfAttention.q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dite.engine.lora.formats import TRANSFORMER, LoraError, LoraFile, display
from dite.models.checkpoint import KeyMap, Source

_SD3_TEXT = {"text_encoder": ("clip_l", "CLIP-L"), "text_encoder_2": ("clip_g", "CLIP-G"),
             "text_encoder_3": ("t5", "T5")}


@dataclass(frozen=True)
class Target:
    component: str  # formats.TRANSFORMER or one of formats.TEXT_ENCODERS
    param: str  # dite's parameter name within the component's module
    source: Source  # how the parameter is built from checkpoint keys (unbuild/build)
    index: int  # which of source.keys this module's weight is


def live_module(pipe, component: str) -> torch.nn.Module | None:
    """The component's module now, or None once dropped (release_encoders); for unloading."""
    if component == TRANSFORMER:
        return pipe.transformer
    return getattr(pipe.text, _SD3_TEXT[component][0], None)


def component_module(pipe, component: str) -> torch.nn.Module:
    """The module a component's LoRA weights merge into; refuses one the pipeline lacks."""
    if component == TRANSFORMER:
        return pipe.transformer
    if pipe.family != "sd3":
        raise LoraError(f"text-encoder LoRA weights ({component}) are merged into SD3's CLIP-L, CLIP-G and T5 only; "
                        f"this is a {pipe.family} pipeline")
    attr, label = _SD3_TEXT[component]
    if "encode_prompts" in pipe.__dict__:  # engine/memory/encoders.py keeps (and may drop) encodings
        raise LoraError(f"cannot merge a {label} LoRA ({component}) into a pipeline that keeps or releases its "
                        "text encoders (release_encoders / --low-memory); load the LoRA before, or with load(loras=...)")
    module = getattr(pipe.text, attr)
    if module is None:
        raise LoraError(f"the LoRA adapts {label} ({component}) but this pipeline was loaded without it; "
                        "load the model with its T5 encoder, or use a LoRA without T5 (lora_te3_) weights")
    return module


def _keymaps(pipe, component: str) -> list[KeyMap]:
    if component != TRANSFORMER:
        module = component_module(pipe, component)
        if component == "text_encoder_3":
            from dite.models.t5 import t5_keymap

            return [t5_keymap(module.config, ())[0]]
        from dite.models.clip import clip_keymap

        # No keys: the wrapped names transformers saves; a key without the wrapper: the flat names.
        return [clip_keymap(module.config, "transformers", keys, "")[0]
                for keys in ((), ("encoder.layers.0.self_attn.q_proj.weight",))]
    cfg = pipe.transformer.config
    if pipe.family == "sd3":
        from dite.models import mmdit

        return [mmdit.keymap(cfg, layout)[0] for layout in ("diffusers", "original")]
    if pipe.family == "pixart":
        from dite.models import pixart

        return [pixart.keymap(cfg, layout)[0] for layout in ("diffusers", "original")]
    raise LoraError(f"LoRAs are merged into SD3 and PixArt transformers; this is a {pipe.family} pipeline")


def module_targets(pipe, component: str = TRANSFORMER) -> dict[str, Target]:
    """Checkpoint module name (without `.weight`) -> Target, for every linear weight of a component."""
    targets: dict[str, Target] = {}
    for keymap in _keymaps(pipe, component):
        for name, source in keymap.items():
            if not name.endswith(".weight") or source.piece is not None:
                continue
            for index, key in enumerate(source.keys):
                if key.endswith(".weight"):
                    targets.setdefault(key.removesuffix(".weight"), Target(component, name, source, index))
    return targets


def resolve(pipe, lora: LoraFile) -> dict[tuple[str, str], Target]:
    """Each of the file's (component, module) -> its Target, every shape checked; nothing is changed."""
    found = {}
    for component in sorted(lora.components):
        targets = module_targets(pipe, component)
        if lora.style == "kohya":
            targets = {module.replace(".", "_"): t for module, t in targets.items()}
        modules = {module for c, module in lora.pairs if c == component}
        unknown = sorted(display(component, m) for m in modules - set(targets))
        if unknown:
            what = f"{pipe.family} transformer" if component == TRANSFORMER else f"{pipe.family} {component}"
            raise LoraError(f"{lora.path.name} adapts {len(unknown)} modules this {what} does not "
                            f"have (such as {unknown[:3]}); is it a LoRA for another model?")
        params = dict(component_module(pipe, component).named_parameters())
        for module in sorted(modules):
            pair, target = lora.pairs[(component, module)], targets[module]
            with torch.no_grad():
                part = target.source.unbuild(params[target.param].detach())[target.index]
            want = (pair.up.shape[0], pair.down.shape[1])
            if tuple(part.shape) != want:
                raise LoraError(f"{lora.path.name}: {display(component, module)} is {tuple(part.shape)} in this model "
                                f"but the LoRA's up @ down is {want}; is it a LoRA for another model?")
            found[(component, module)] = target
    return found
