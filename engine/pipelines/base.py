"""What every family's pipeline shares: components, device/dtype, metadata, and the ONE call
skeleton (`Pipeline.generate`): argument checks, seeds and noise, timed encode / denoise /
decode, the result record. A family's `__call__` checks its own arguments and hands over a
`Request` (how many images, how to condition them, what each records); a feature that changes
how a call starts or ends (img2img's initial latents, inpainting's mask) belongs in the
skeleton, once, for every family."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import torch

from dite.accel.build import as_methods, build_plans, resolve
from dite.accel.methods import PlanContext
from dite.accel.tuned import call_steps
from dite.engine.runtime.accounting import FlopCounts, accel_spec, accel_stats
from dite.engine.version import dite_version
from dite.engine.errors import ConfigError, InputError
from dite.engine.families import BY_NAME as FAMILY_BY_NAME
from dite.engine.pipelines import arguments
from dite.engine.pipelines.init_image import InitImage, start_step
from dite.engine.pipelines.noise import image_generators, initial_latents
from dite.engine.runtime.finite import check_tensor, dtype_hint
from dite.engine.runtime.sampling import GenerationState, denoise
from dite.engine.runtime.slg import SkipLayerGuidance
from dite.models.denoiser import Conditioning, Denoiser
from dite.models.plan import StepPlan
from dite.models.vae import AutoencoderKL
from dite.schedulers.base import Scheduler, SchedulerState

if TYPE_CHECKING:
    from dite.engine.pipelines.output import GenerationOutput

# What a model is trained to predict (Scheduler.objective), in words.
OBJECTIVES = {"flow": "a flow-matching velocity", "diffusion": "diffusion noise (epsilon, v or x0)"}


@dataclasses.dataclass
class Call:
    """A generation call's shared arguments once checked (Pipeline.check_call)."""

    steps: int
    guidance: float
    seed: int
    generators: list[torch.Generator]
    size: tuple[int, int]  # latent (h, w)
    latents: torch.Tensor | None
    output_type: str
    methods: list
    plans: list[StepPlan]
    scheduler: SchedulerState

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0


@dataclasses.dataclass
class Request:
    """A family's part of one call, its own arguments already checked; `Pipeline.generate`
    does the rest. `conditioning(call)` runs inside the timed encode stage; `records(call)`
    gives one parameter dict per image (prompt or class label); `recorded`: what every image
    records besides steps and guidance. `height`/`width` (pixels, None: the model's
    `default_latent` x VAE factor) are generated; `resize_to` (height, width), where given, is
    what the call returns (PixArt's resolution binning)."""

    count: int
    conditioning: Callable[[Call], Conditioning]
    records: Callable[[Call], list[dict[str, Any]]]
    default_latent: int
    recorded: dict[str, Any] = dataclasses.field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    resize_to: tuple[int, int] | None = None
    # Image-to-image / inpainting (engine/pipelines/init_image.py), checked by the family.
    init: InitImage | None = None
    # Skip-layer guidance (engine/runtime/slg.py), checked by the family; needs CFG.
    slg: SkipLayerGuidance | None = None


@dataclasses.dataclass
class Prompts:
    """A text call's prompts, one per image (image k is prompt k // n: copies of one prompt
    are adjacent), each with its negative prompt, and the text encoder's sequence length."""

    per_image: list[str]
    negatives: list[str]
    length: int

    @classmethod
    def check(cls, pipe: "Pipeline", prompt, negative_prompt, num_images_per_prompt, max_sequence_length, *,
              default_length: int, longest: int) -> "Prompts":
        """Check the text arguments (None: the model's recorded default, else the family's
        `default_length`) and expand them to one per image."""
        prompts = arguments.prompt_list("prompt", prompt)
        negatives = arguments.negative_prompts(negative_prompt, len(prompts))
        length = pipe.given_or_default("max_sequence_length", max_sequence_length, default_length,
                                       lambda v: arguments.max_sequence_length(v, longest))
        per_prompt = arguments.integer("num_images_per_prompt", num_images_per_prompt, minimum=1,
                                       maximum=arguments.MAX_IMAGES)
        return cls([p for p in prompts for _ in range(per_prompt)],
                   [p for p in negatives for _ in range(per_prompt)], length)

    def negatives_for(self, call: Call) -> list[str] | None:
        """Unguided, the negative prompts (checked all the same) play no part."""
        return self.negatives if call.guided else None

    def records(self, call: Call) -> list[dict[str, Any]]:
        negatives = self.negatives_for(call)
        return [{"prompt": p, "negative_prompt": negatives[k] if negatives else None}
                for k, p in enumerate(self.per_image)]


class Pipeline:
    """A loaded model: `transformer` (the denoiser, with `.blocks`), `vae`, `scheduler`."""

    family = ""
    # What the denoiser was trained to predict; schedulers for another objective are refused.
    objective = "diffusion"

    def __init__(self, transformer: Denoiser, vae: AutoencoderKL, scheduler: Scheduler, *, source: str = ""):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.source = source
        self.model_name = source  # what image metadata records; load() sets it without local folders
        # Sampling defaults the model records for itself (model_index.json "_dite": e.g. the
        # demo SD3's T5 length); an argument given explicitly always wins.
        self.defaults: dict = {}
        # How each denoising step runs (engine/runtime/executors): eager unless load(executor=...)
        # or an assignment says otherwise. It keeps compiled graphs, never per-call state.
        # Imported here, not with the module: importing dite imports no executor.
        from dite.engine.runtime.executors.eager import EagerExecutor

        self.executor = EagerExecutor()
        # Where `out.stats` keeps its FLOP counts (engine/runtime/accounting.py); None: this
        # process's, for every pipeline. The CLI names a folder, so the next run reads them.
        self.flop_counts: FlopCounts | None = None
        # The scheduler the model came with: its prediction type (epsilon, v_prediction,
        # sample) and noise table (ᾱ) are the training's; a replacement must share them.
        self.training_scheduler = scheduler

    def default(self, name: str, value, family_default):
        """`value` if given, else the model's recorded default, else the family's."""
        if value is not None:
            return value
        return self.defaults.get(name, family_default)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downscale

    def latent_size(self, height: int | None, width: int | None, default_latent: int) -> tuple[int, int]:
        """Check a pixel size against the patch x VAE factor (and the model's position table,
        where it has one); return the latent (h, w)."""
        factor = self.vae_scale_factor * self.transformer.config.patch_size
        height = default_latent * self.vae_scale_factor if height is None else height
        width = default_latent * self.vae_scale_factor if width is None else width
        largest = self.max_size()
        sizes = []
        for name, value in (("height", height), ("width", width)):
            value = arguments.integer(name, value, minimum=1)
            if value % factor:
                raise InputError(
                    f"{name} {value} must be a positive multiple of {factor} (VAE factor "
                    f"{self.vae_scale_factor} x patch size {self.transformer.config.patch_size})"
                )
            if largest is not None and value > largest[0]:
                raise InputError(f"{name} {value} is beyond {largest[1]}: at most {largest[0]} pixels")
            sizes.append(value // self.vae_scale_factor)
        return sizes[0], sizes[1]

    def max_size(self) -> tuple[int, str] | None:
        """(largest height or width in pixels, why) where the model has a fixed position
        table; None where positions are computed for any size (DiT, PixArt)."""
        return None

    @property
    def passes_model_variance(self) -> bool:
        """Whether the pipeline hands the model's learned-variance channels to the scheduler."""
        return False

    def check_scheduler(self, scheduler: Any = None) -> Scheduler:
        """Refuse a scheduler that does not fit how the model was trained (load(scheduler=)
        and every call check it): another objective (DDIM on a flow-matching model, flow
        Euler on a noise-prediction one), another prediction type, or a learned variance the
        model does not give. The message lists the schedulers that fit."""
        from dite.schedulers import BY_NAME

        scheduler = self.scheduler if scheduler is None else scheduler
        fits = ", ".join(sorted(name for name, cls in BY_NAME.items() if cls.objective == self.objective))
        if not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a dite scheduler object (a name goes through load(scheduler=NAME) "
                              f"or dite.schedulers.by_name), got {arguments.shown(scheduler)}; for this model: {fits}")
        name = scheduler.name or type(scheduler).__name__
        if scheduler.objective and scheduler.objective != self.objective:
            raise ConfigError(f"scheduler {name!r} samples models trained on {OBJECTIVES[scheduler.objective]}, but "
                              f"this {self.family} model predicts {OBJECTIVES[self.objective]}; use one of: {fits}")
        trained = self.training_scheduler
        rebuild = (f"build it from the model's: dite.schedulers.by_name({scheduler.name!r}, "
                   "pipe.training_scheduler.to_diffusers_config()), as load(scheduler=NAME) does")
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        expected = getattr(getattr(trained, "config", None), "prediction_type", None)
        if expected and prediction and prediction != expected:
            raise ConfigError(f"scheduler {name!r} has prediction_type={prediction!r} but this model predicts "
                              f"{expected!r}; {rebuild}")
        table, trained_table = getattr(scheduler, "alphas_cumprod", None), getattr(trained, "alphas_cumprod", None)
        if table is not None and trained_table is not None and (
                table.shape != trained_table.shape or not torch.allclose(table, trained_table, atol=1e-6)):
            described = getattr(getattr(scheduler, "config", None), "beta_schedule", "?")
            original = getattr(getattr(trained, "config", None), "beta_schedule", "?")
            raise ConfigError(f"scheduler {name!r} has another noise schedule (beta_schedule={described!r}, "
                              f"{table.shape[0]} steps) than this model was trained with ({original!r}, "
                              f"{trained_table.shape[0]} steps); {rebuild}")
        if scheduler.uses_model_variance and not self.passes_model_variance:
            raise ConfigError(f"scheduler {name!r} (variance_type={scheduler.config.variance_type!r}) needs the "
                              "model's learned variance, which this pipeline does not give it; use "
                              "variance_type='fixed_small'")
        return scheduler

    def start_scheduler(self, steps: int, generators: list[torch.Generator], size: tuple[int, int]) -> SchedulerState:
        """The scheduler's state for one call (flow schedulers with dynamic shifting also
        take the number of image tokens)."""
        if getattr(self.scheduler, "needs_image_seq_len", False):
            patch = self.transformer.config.patch_size
            tokens = (size[0] // patch) * (size[1] // patch)
            return self.scheduler.start(steps, generators=generators, device=self.device, image_seq_len=tokens)
        return self.scheduler.start(steps, generators=generators, device=self.device)

    def given_or_default(self, name: str, value, family_default, check: Callable):
        """`check(value)` if given; else the model's recorded default or the family's,
        checked too (a bad default in model_index.json is named as such)."""
        if value is not None:
            return check(value)
        try:
            return check(self.defaults.get(name, family_default))
        except InputError as exc:
            raise ConfigError(f"{exc} (the model's default, model_index.json \"_dite\"); give {name}= "
                              "explicitly") from None

    def check_call(self, *, images: int, height, width, default_latent: int, num_inference_steps, guidance_scale,
                   seed, latents, output_type, accel, progress, plan_hook, init: InitImage | None = None) -> Call:
        """Every argument the families share, checked in one place before anything is
        encoded; also starts the scheduler and builds the step plans, which check the step
        count and the accel spec. `images`: the number of images the call makes. With `init`
        (image-to-image) the scheduler's state is the tail of the schedule that runs, and
        the plans are built for those steps."""
        family = FAMILY_BY_NAME[self.family]
        output_type = arguments.output_type(output_type)
        arguments.flag("progress", progress)
        arguments.callable_or_none("plan_hook", plan_hook)
        arguments.accel(accel)
        steps = self.given_or_default("num_inference_steps", num_inference_steps, family.default_steps,
                                      arguments.steps)
        guidance = self.given_or_default("guidance_scale", guidance_scale, family.default_guidance,
                                         arguments.guidance)
        size = self.latent_size(height, width, default_latent)
        count = arguments.images(images)
        seed = arguments.seed(seed, count)
        latents = arguments.latents(latents, (count, self.transformer.config.in_channels, *size))
        self.check_scheduler()
        steps = call_steps(accel, steps, self, size)  # tuned(file=...): checked here, may run fewer steps
        train_steps = getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", None)
        if self.scheduler.objective == "diffusion" and train_steps and steps > train_steps:
            raise InputError(f"num_inference_steps {steps} is more than the {train_steps} timesteps of the "
                             f"{self.scheduler.name} scheduler's noise table; use at most {train_steps}")
        generators = image_generators(seed, count)
        scheduler = self.start_scheduler(steps, generators, size)
        if init is not None:
            scheduler = self.scheduler.from_step(scheduler, start_step(steps, init.strength))
        methods, plans = self.plan_steps(accel, scheduler.num_steps, guidance > 1.0)
        return Call(steps=steps, guidance=guidance, seed=seed, generators=generators, size=size, latents=latents,
                    output_type=output_type, methods=methods, plans=plans, scheduler=scheduler)

    @property
    def model_id(self) -> str:
        """Fingerprint of the denoiser and any text-encoder LoRAs (calibrated plans are tied to it); computed once."""
        if "_model_id" not in self.__dict__:
            from dite.accel.fastattn import model_fingerprint

            from dite.engine.lora.merge import fingerprint  # text-encoder LoRAs change it too

            self._model_id = fingerprint(self, model_fingerprint(self.transformer))
        return self._model_id

    def plan_steps(self, accel, steps: int, guided: bool) -> tuple[list, list[StepPlan]]:
        """The accel methods (resolved for this call) and one plan per step."""
        ctx = PlanContext(self.family, len(self.transformer.blocks), steps, guided, self.model_id)
        methods = resolve(as_methods(accel), ctx)
        return methods, build_plans(methods, ctx)

    def count_stats(self, methods, plans, state: GenerationState, x_shape, cond) -> Callable[[], dict[str, Any]]:
        """The call's `out.stats`, to be counted when first read: counting FLOPs runs the
        plans on the meta device, which a caller who never reads them should not wait for."""
        transformer, counts = self.transformer, self.flop_counts
        steps_run, executor, decisions = state.steps_run, state.executor, state.ranges.decisions

        def count() -> dict[str, Any]:
            stats = accel_stats(transformer, methods, plans, steps_run, tuple(x_shape), cond, counts)
            stats["executor"] = executor
            if decisions:
                stats["adaptive_decisions"] = decisions  # per step: range, which samples ran it
            return stats

        return count

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1]."""
        z = self.vae.from_model_space(latents.to(next(self.vae.parameters()).dtype))
        return self.vae.decode(z)

    @property
    def prediction_channels(self) -> int:
        """How many of the denoiser's output channels are the prediction (the rest, a
        learned variance, reach the scheduler only where it uses them)."""
        return self.transformer.config.in_channels

    def generate(self, request: Request, **arguments) -> "GenerationOutput":
        """One call, counted so that LoRA loads/unloads wait or refuse while it runs (engine/lora)."""
        from dite.engine.lora import calls_running

        with calls_running(self):
            return self._generate(request, **arguments)

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Merge a LoRA file into the denoiser (docs/lora.md); returns its name (default: the file stem)."""
        from dite.engine.lora import load_lora

        return load_lora(self, path, scale, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Take a LoRA out again (None: all); the weights are restored bit for bit (docs/lora.md)."""
        from dite.engine.lora import unload_lora

        unload_lora(self, name)

    def _generate(self, request: Request, *, num_inference_steps, guidance_scale, seed, latents, output_type,
                  progress, accel, plan_hook) -> "GenerationOutput":
        """The call skeleton every family runs: check the shared arguments, condition, draw
        the noise, denoise, decode, and record each image's parameters. With `request.init`
        (docs/img2img.md): encode the init image, noise it to the first step that runs, run
        the remaining steps, and with a mask put the kept region back after every step."""
        init = request.init
        height, width = request.height, request.width
        if init is not None:  # the image's size unless given (init_image.check: given = the image's)
            height, width = init.height, init.width
            try:
                self.latent_size(height, width, request.default_latent)
            except InputError as exc:
                raise InputError(f"the init image is {width}x{height} pixels: {exc}; resize or crop it") from None
        call = self.check_call(images=request.count, height=height, width=width,
                               default_latent=request.default_latent, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, seed=seed, latents=latents, output_type=output_type,
                               accel=accel, progress=progress, plan_hook=plan_hook, init=init)
        if request.slg is not None and not call.guided:
            raise InputError(f"skip-layer guidance works on the guided (CFG) prediction, and guidance_scale is "
                             f"{call.guidance}: use a guidance scale above 1 or drop skip_guidance_layers")
        if request.slg is not None and self.executor.name == "parallel":
            # its extra pass runs outside the executor: whole, on every rank (not built yet)
            raise ConfigError("skip-layer guidance does not run under parallel generation yet; generate on one "
                              "device or drop skip_guidance_layers")
        timings: dict[str, float] = {}
        after_step = None
        with timed(timings, "encode"):
            cond = request.conditioning(call)
            # img2img: the image's latents draw from each image's generator before the noise does
            # (diffusers' order with one generator per image).
            clean = self.encode_init(init, call) if init is not None else None
            x = initial_latents((self.transformer.config.in_channels, *call.size), call.generators, call.latents,
                                device=self.device, dtype=self.dtype)
            if clean is None:
                x = x * self.scheduler.init_noise_sigma(call.scheduler)
            else:
                noise, x = x, self.scheduler.noise_to(clean, x, call.scheduler, 0)
                if init.mask is not None:
                    after_step = self.keep_known_region(init, call, clean, noise)
        with timed(timings, "denoise"):
            state = GenerationState(scheduler=call.scheduler)
            x0_shape = x.shape
            x = denoise(self.transformer, self.scheduler, x, cond, state, plans=call.plans, plan_hook=plan_hook,
                        executor=self.executor, guidance_scale=call.guidance,
                        prediction_channels=self.prediction_channels,
                        pass_model_variance=self.passes_model_variance and self.scheduler.uses_model_variance,
                        progress=progress, after_step=after_step, slg=request.slg)
        stats = self.count_stats(call.methods, call.plans, state, x0_shape, cond)
        return self.finish(x, call, request, timings, stats)

    def encode_init(self, init: InitImage, call: Call) -> torch.Tensor:
        """The init image in model-space latents, one row per image: a sample of the VAE's
        posterior drawn from image k's generator (diffusers' `retrieve_latents` default)."""
        vae_param = next(self.vae.parameters())
        rows = []
        for k, generator in enumerate(call.generators):
            pixels = init.pixels[k if init.pixels.shape[0] > 1 else 0][None]
            z = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).sample(generator)
            rows.append(self.vae.to_model_space(z))
        return torch.cat(rows).to(self.device, self.dtype)

    def keep_known_region(self, init: InitImage, call: Call, clean: torch.Tensor, noise: torch.Tensor):
        """Inpainting's step hook: after step i, the region the mask keeps (black) is the
        image's latents noised to step i + 1's level (clean after the last step), as
        diffusers' SD3 inpainting does for a 16-channel transformer (mask resized to the
        latents by nearest neighbour)."""
        mask = torch.nn.functional.interpolate(init.mask, size=call.size).to(self.device, self.dtype)
        state, last = call.scheduler, call.scheduler.num_steps - 1

        def blend(i: int, x: torch.Tensor) -> torch.Tensor:
            known = self.scheduler.noise_to(clean, noise, state, i + 1) if i < last else clean
            return (1 - mask) * known + mask * x

        return blend

    def finish(self, x: torch.Tensor, call: Call, request: Request, timings: dict[str, float],
               stats: Callable[[], dict[str, Any]]) -> "GenerationOutput":
        """Decode (unless "latent") and assemble the output with one parameter dict per image.
        With `request.resize_to` (height, width) the decoded images are scaled and
        centre-cropped to it (PixArt's resolution binning generates at a bin size, then
        returns the requested one)."""
        from dite.engine.pipelines.images import postprocess
        from dite.engine.pipelines.output import GenerationOutput
        from dite.engine.lora import lora_record

        images = None
        resize_to = request.resize_to
        if call.output_type != "latent":
            with timed(timings, "decode"):
                decoded = self.decode(x)
                # One host sync per call: a NaN here would otherwise be a black image.
                check_tensor(decoded, "the VAE's decoded images",
                             dtype_hint(next(self.vae.parameters()).dtype))
                if resize_to is not None:
                    from dite.engine.pipelines.pixart_bins import resize_and_crop

                    decoded = resize_and_crop(decoded, *resize_to)
                images = postprocess(decoded, call.output_type)
        h, w = call.size
        out_h, out_w = resize_to if resize_to is not None else (h * self.vae_scale_factor, w * self.vae_scale_factor)
        base = {"model": self.model_name, "family": self.family, "scheduler": self.scheduler.name,
                "size": f"{out_w}x{out_h}", "steps": call.steps, "guidance": call.guidance, **request.recorded,
                **(dict(request.init.recorded, denoise_steps=call.scheduler.num_steps) if request.init else {}),
                **(request.slg.recorded() if request.slg else {}),
                "accel": accel_spec(call.methods), **lora_record(self),
                "dite_version": dite_version()}
        latents = "given" if call.latents is not None else "seeded"
        params = [{**base, **extra, "seed": call.seed + k, "latents": latents}
                  for k, extra in enumerate(request.records(call))]
        return GenerationOutput(images=images, latents=x, parameters=params, timings=timings, count_stats=stats)

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.transformer.parameters())
        return {
            "family": self.family,
            "source": self.source,
            "transformer": self.transformer.config.to_dict(),
            "transformer_parameters": params,
            "vae": dataclasses.asdict(self.vae.config),
            "vae_parameters": sum(p.numel() for p in self.vae.parameters()),
            "scheduler": self.scheduler.to_diffusers_config(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


@contextmanager
def timed(timings: dict[str, float], stage: str):
    from dite.engine.runtime.progress import stage as announce  # reports to a caller's reporter, if any

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        with announce(stage):
            yield
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
