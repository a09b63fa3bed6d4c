"""The `dite` command line: generate, inspect, accel, serve (engine/serve/command.py).

Every error the user can cause is one line on stderr and a non-zero exit code; tracebacks
are for bugs (set DITE_DEBUG=1 to see them for user errors too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from dite.engine.dtypes import PRECISIONS
from dite.engine.errors import ConfigError, DiteError, InputError

EXIT_USER_ERROR = 2
# Checked before anything is loaded: no model here takes more steps, or a side this long.
MAX_STEPS = 1000
MAX_SIDE = 16384
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as dite reports every user error: one line on
    stderr, exit code 2 (argparse's default prints the whole usage first)."""

    def error(self, message: str):
        print(f"dite: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x256 (width x height), got {text!r}") from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be between 1 and {MAX_SIDE} pixels")
    return w, h


def _int_in(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse type: an int in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bound}")
        return value
    return parse


def _block_list(text: str) -> list[int]:
    """An argparse type: comma-separated block indices ("7,8,9")."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block indices, "
                                         "e.g. 7,8,9") from None


def _lora_spec(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE]: the scale is what follows the last colon when it is a number."""
    path, _, scale = text.rpartition(":")
    try:
        float(scale)
    except ValueError:
        return text, 1.0  # no scale given (or a colon inside the path)
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} names no LoRA file; give PATH or PATH:SCALE")
    try:
        return path, _finite()(scale)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"LoRA scale {exc}") from None


def _finite(low: float | None = None):
    """An argparse type: a finite float (NaN and inf mean nothing here), at least `low`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low}")
        return value
    return parse


_steps = _int_in(1, MAX_STEPS, "a step count")
_positive = _int_in(1)
_seed = _int_in(0, MAX_SEED, "a seed (an integer)")
_seed_or_random = _int_in(-1, MAX_SEED, "a seed (an integer, or -1 for a random one)")


def _budget(text: str) -> float:
    """--budget: a share of the plain call's compute, in (0, 1]."""
    value = _finite()(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: the budget is a share of the plain call's compute")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command's arguments. Long because it is one flat list of declarations, read
    top to bottom like `dite --help`; splitting it would only scatter them."""
    parser = _Parser(prog="dite", description="Diffusion transformer inference engine")
    parser.add_argument("--version", action="version", version=f"dite {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make images: text-to-image (SD3, PixArt) or class-to-image (DiT)")
    parser.generate_parser = gen  # --from-image sets its defaults from an image
    gen.add_argument("prompt", nargs="*", help="prompt(s) for text-to-image models; one image set per prompt")
    gen.add_argument("--model", default=None,
                     help="pipeline folder, checkpoint file, hub repo id, or a demo: demo-sd3 / demo-dit / demo-pixart "
                          "(shipped with dite), demo-sd3-128 (in a source checkout). Default: demo-sd3 for a prompt, "
                          "demo-dit for --class-label")
    gen.add_argument("--class-label", action="append", default=[], metavar="ID",
                     help="class index (or name, if the model has label names); repeat for several images")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from (text-to-image)")
    gen.add_argument("--images-per-prompt", type=_positive, default=1)
    gen.add_argument("--max-sequence-length", type=_positive, default=None,
                     help="T5 tokens (default: the model's recorded one, else SD3 256, PixArt-α 120, PixArt-Σ 300)")
    gen.add_argument("--no-t5", action="store_true", help="SD3 without T5 (low memory; its tokens become zeros)")
    gen.add_argument("--steps", type=_steps, default=None,
                     help=f"denoising steps, 1 to {MAX_STEPS} (default: the family's, DiT 50, SD3 28, PixArt 20)")
    gen.add_argument("--guidance", type=_finite(), default=None,
                     help="classifier-free guidance scale (default: the family's, DiT 4.0, SD3 7.0, PixArt 4.5)")
    gen.add_argument("--seed", type=_seed_or_random, default=0,
                     help="seed of the first image; image k of the run uses seed+k (default 0); -1: a random seed, "
                          "printed and recorded in the images")
    gen.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: the model's)")
    gen.add_argument("--init-image", default=None, metavar="PATH",
                     help="image-to-image: start from this image (generated at its size; never resized)")
    gen.add_argument("--strength", type=_finite(), default=None,
                     help="with --init-image: share of the schedule that runs, in (0, 1] (default 0.6)")
    gen.add_argument("--mask", default=None, metavar="PATH",
                     help="inpainting (SD3, PixArt), with --init-image: white = repaint, black = keep")
    gen.add_argument("--skip-layers", type=_block_list, default=None, metavar="I,J,...",
                     help="skip-layer guidance (SD3.5-medium: 7,8,9): blocks skipped in an extra conditional pass "
                          "(docs/slg.md)")
    gen.add_argument("--slg-scale", type=_finite(), default=None, help="with --skip-layers: its scale (default 2.8)")
    gen.add_argument("--slg-start", type=_finite(), default=None,
                     help="with --skip-layers: share of the steps where it starts (default 0.01)")
    gen.add_argument("--slg-stop", type=_finite(), default=None,
                     help="with --skip-layers: share of the steps where it stops (default 0.2)")
    gen.add_argument("--scheduler", default=None, help="replace the model's scheduler: ddim, ddpm, dpm (DPM-Solver++) or flow_euler (alias euler)")
    gen.add_argument("--lora", action="append", type=_lora_spec, default=None, metavar="PATH[:SCALE]",
                     help="merge a LoRA (SD3 incl. its text encoders, PixArt; diffusers or kohya keys) with SCALE (default 1); repeatable")
    gen.add_argument("--vae", default=None, help="VAE for checkpoints without one (original DiT .pt, PixArt .pth)")
    gen.add_argument("--tokenizers", default=None, metavar="PATH",
                     help="SD3 single files: folder (or hub repo id) holding tokenizer/, tokenizer_2/, tokenizer_3/; "
                          "PixArt .pth: one holding tokenizer/ (default: looked up beside the file)")
    gen.add_argument("--accel", default=None, metavar="SPEC",
                     help='training-free acceleration, e.g. "ditcache+promptgate+todo" (see `dite accel`)')
    gen.add_argument("--device", default="cpu", help="cpu, cuda, npu (Ascend, needs torch_npu + CANN) or auto")
    gen.add_argument("--executor", default="eager", choices=["eager", "compiled", "npu-graph"],
                     help="eager (default), compiled (torch.compile static graphs, warmed before the loop) or "
                          "npu-graph (torchair on Ascend)")
    gen.add_argument("--compile-backend", default=None, metavar="NAME",
                     help="compiled: torch.compile backend (default inductor; aot_eager traces without codegen)")
    gen.add_argument("--compile-mode", default=None, metavar="MODE",
                     help="compiled: torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    gen.add_argument("--npu-route", default=None, choices=["ge", "aclgraph"],
                     help="npu-graph: TorchAir GE graph mode (default) or aclgraph capture (npugraph_ex)")
    gen.add_argument("--attention", default="sdpa", choices=["sdpa", "math", "npu"],
                     help="attention kernel of the denoiser: PyTorch SDPA (default), the explicit math reference, "
                          "or torch_npu's fused attention on Ascend")
    gen.add_argument("--dtype", default="auto",
                     help="auto (default: CUDA bf16, else fp16; Ascend bf16; CPU fp32 or bf16, whichever a one-time "
                          "probe finds faster; VAE in fp32), fp32, fp16 or bf16")
    gen.add_argument("--model-config", default=None, metavar="JSON",
                     help="what shapes cannot tell, as load(model_config=...): a JSON string or file")
    gen.add_argument("-o", "--output", default="out.png",
                     help="image path ending in .png, .jpg or .webp (its folder must exist); several images are "
                          "named by --name-pattern")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_batch_arguments(gen)
    gen.add_argument("--nproc", type=_positive, default=None, metavar="N",
                     help="start N local worker processes (gloo on CPU) for --parallel; under torchrun leave it out")
    gen.add_argument("--parallel", default=None, metavar="SPEC",
                     help="split one generation over the processes: cfg=2 (the CFG branches), ulysses=U (image "
                          "tokens), data=D (the images); the product is the process count (docs/parallel.md)")

    cal = sub.add_parser("calibrate", help="calibrate a DiTFastAttn plan (use it with --accel fastattn(plan=FILE))")
    cal.add_argument("--model", default=None, help="as for generate (default: demo-sd3)")
    cal.add_argument("--steps", type=_steps, required=True, help="plans are specific to the step count")
    cal.add_argument("--threshold", type=_finite(0.0), default=0.05,
                     help="loss threshold δ (the last layer's; grows with depth)")
    cal.add_argument("--window", type=_int_in(0), required=True,
                     help="band half-width w in tokens (N/8 in the reference)")
    cal.add_argument("--calib", type=_positive, default=4, help="calibration prompts / class labels")
    cal.add_argument("--prompt", action="append", default=None, help="calibration prompt (repeat); default: built-in")
    cal.add_argument("--class-label", action="append", default=None, metavar="ID",
                     help="calibration class label, index or name (repeat; DiT); default: seeded, from the named classes")
    cal.add_argument("--guidance", type=_finite(), default=None)
    cal.add_argument("--negative-prompt", default="")
    cal.add_argument("--metric", default="relative", choices=["relative", "ssim"],
                     help="relative (the reference's) or ssim")
    cal.add_argument("--max-signatures", type=_positive, default=None,
                     help="merge steps into at most K distinct step plans (graph executors compile one per plan)")
    cal.add_argument("--size", type=_size, default=None, metavar="WxH")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="fp32")
    cal.add_argument("-o", "--output", required=True, help="plan file (JSON)")

    tun = sub.add_parser("tune", help="search accel methods and settings for a compute budget (use the file with "
                                      "--accel \"tuned(file=FILE)\")")
    tun.add_argument("--model", default=None, help="as for generate (default: demo-sd3; demo-dit with --class-label)")
    tun.add_argument("--budget", type=_budget, required=True,
                     help="largest mean compute to keep, as a share of the plain call's, in (0, 1] (e.g. 0.6)")
    tun.add_argument("--metric", default="compute", choices=["compute", "flops"],
                     help="what the budget counts: compute (block evaluations x rows, default) or flops (denoiser "
                          "FLOPs; also tries todo and --fastattn-plan files)")
    tun.add_argument("--steps", type=_steps, default=None, help="the step count to tune for (default: the model's)")
    tun.add_argument("--guidance", type=_finite(), default=None, help="guidance scale (default: the model's)")
    tun.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: the model's)")
    tun.add_argument("--prompts", default=None, metavar="FILE",
                     help="calibration prompts, one a line (default: a built-in list of simple generic prompts)")
    tun.add_argument("--class-label", action="append", default=None, metavar="ID",
                     help="calibration class label, index or name (repeat; DiT); default: seeded, from the named "
                          "classes")
    tun.add_argument("--negative-prompt", default=None)
    tun.add_argument("--calibration", type=_positive, default=4, help="calibration prompts / labels (default 4)")
    tun.add_argument("--screen", type=_positive, default=2,
                     help="inputs every candidate is first measured on; the best 5 then on all (default 2)")
    tun.add_argument("--methods", default=None, metavar="NAMES",
                     help="comma-separated families to search: ditcache, deltacache, schedule, adaptive (default: "
                          "all; fewer steps is always a contender)")
    tun.add_argument("--fastattn-plan", action="append", default=[], metavar="PATH",
                     help="a DiTFastAttn plan file to try (repeat; --metric flops)")
    tun.add_argument("--seed", type=_seed, default=1000, help="seed of the first calibration image (default 1000)")
    tun.add_argument("--device", default="cpu")
    tun.add_argument("--dtype", default="fp32")
    tun.add_argument("-o", "--output", required=True, help="tuned file (JSON) to write")
    tun.add_argument("--quiet", action="store_true", help="no line per candidate")

    acc = sub.add_parser("accel", help="list the acceleration methods, their parameters and defaults")
    acc.add_argument("--json", action="store_true", help="machine-readable output")

    conv = sub.add_parser("convert", help="convert a checkpoint between the original and diffusers layouts")
    conv.add_argument("source", help="checkpoint file or folder, hub repo id, or a demo name (demo-sd3, demo-dit, demo-pixart, ...)")
    conv.add_argument("destination", help="folder (--to diffusers) or file (--to original); never the source, a "
                                          "folder holding it or a place inside a source folder")
    conv.add_argument("--to", required=True, choices=["diffusers", "original"])
    conv.add_argument("--dtype", default=None, choices=list(PRECISIONS),
                      help="cast floating tensors (default: keep each tensor's own)")
    conv.add_argument("--max-shard-size", default=None, metavar="SIZE",
                      help="largest weights file of a diffusers folder, e.g. 5GB (default: one file)")
    conv.add_argument("--components", default=None, metavar="NAMES",
                      help="comma-separated diffusers component names to convert (default: all)")
    conv.add_argument("--force", action="store_true",
                      help="replace an existing destination (only it, and only once the new output is complete)")
    conv.add_argument("--tokenizers", default=None, metavar="PATH",
                      help="SD3 single file -> diffusers: folder holding tokenizer/, tokenizer_2/, tokenizer_3/")
    conv.add_argument("--vae", default=None, metavar="PATH", help="VAE to include (an original DiT .pt has none)")
    conv.add_argument("--text-encoders", default="bundled", choices=["bundled", "separate"],
                      help="SD3 -> original: encoders inside the file, or in text_encoders/ beside it")
    conv.add_argument("--model-config", default=None, metavar="JSON",
                      help="what shapes cannot tell, as load(model_config=...): a JSON string or file")

    from dite.engine.serve.command import add_parser as add_serve_parser  # imports no server library

    add_serve_parser(sub, positive=_positive, finite=_finite, lora_spec=_lora_spec)

    ins = sub.add_parser("inspect", help="describe a model source without loading it")
    ins.add_argument("source", help="checkpoint file or folder, hub repo id, or a demo name (demo-sd3, demo-dit, demo-pixart, ...)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--model-config", default=None, metavar="JSON",
                     help="what shapes cannot tell, as load(model_config=...): a JSON string or file")
    return parser


def _version() -> str:
    from dite.engine.version import dite_version

    return dite_version()


def _add_batch_arguments(gen) -> None:
    """generate's options for many images in one start-up (engine/outputs/)."""
    gen.add_argument("--prompt-file", default=None, metavar="FILE",
                     help="one prompt a line (DiT: a class label a line), or JSON Lines with per-line prompt, "
                          "negative, seed, size, steps, guidance, accel; the model loads once")
    gen.add_argument("--batch-count", type=_positive, default=1, metavar="N",
                     help="repeat the whole run N times, seeds running on (default 1)")
    gen.add_argument("--name-pattern", default=None, metavar="PATTERN",
                     help="file names of several images, with the -o suffix: fields {stem} {index} {seed} {line} "
                          "{batch} {prompt} (default {stem}-{index}-{seed})")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace existing output files (default: refuse before loading anything)")
    gen.add_argument("--vae-dtype", default=None, choices=list(PRECISIONS),
                     help="the VAE's dtype (default: fp32 with --dtype auto, else --dtype)")
    gen.add_argument("--low-memory", action="store_true",
                     help="release the text encoders once the run's prompts are encoded (the last call's encoding)")
    gen.add_argument("--vae-tiling", action="store_true",
                     help="decode in overlapping 512-pixel tiles (less memory for large images)")
    gen.add_argument("--weights-dtype", default=None, choices=["fp8", "fp8_e5m2"],
                     help="keep linear weights in fp8 (e4m3fn; or e5m2), upcast per layer as it runs: half the "
                          "memory of bf16 weights; fp8 checkpoints are read as they are")
    gen.add_argument("--offload", default=None, choices=["model", "sequential"],
                     help="keep weights in CPU memory and move them to --device as they run: one component at a "
                          "time (model) or block by block (sequential, slowest, least GPU memory)")
    gen.add_argument("--from-image", default=None, metavar="IMAGE",
                     help="make IMAGE again from the settings it records (an image written by dite generate); "
                          "options given explicitly override them")


def check_writable(paths: list[Path], flag: str = "--output") -> None:
    """Refuse, before any work, outputs that could not be written: a path that is a folder,
    a folder that does not exist, one that cannot be written to, a read-only file."""
    for path in paths:
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder: give a file path inside it")
    folders = {path.parent for path in paths}
    for folder in folders:
        shown = folder if str(folder) != "." else Path.cwd()
        if not folder.exists():
            raise InputError(f"{flag} {paths[0]}: folder {shown} does not exist; create it first")
        if not folder.is_dir():
            raise InputError(f"{flag} {paths[0]}: {shown} is not a folder")
        try:  # the only sure test (permissions, read-only file systems, root): write a file
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".dite-write-test-"):
                pass
        except OSError as exc:
            raise InputError(f"{flag} {paths[0]}: cannot write in {shown} ({exc.strerror or exc})") from None
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path} exists and is read-only")


def _labels(values: list[str] | None) -> list[int | str] | None:
    """--class-label values: indices as ints, anything else a class name for the model's id2label."""
    if not values:
        return None
    labels = [int(x) if x.strip().lstrip("-").isdigit() else x for x in values]
    negative = [x for x in labels if isinstance(x, int) and x < 0]
    if negative:
        raise InputError(f"--class-label {negative[0]} is negative: class labels are indices 0, 1, ... or class names")
    return labels


def _existing_or_hub(value: str | None, flag: str) -> None:
    """A path argument that is neither an existing path nor a hub repo id fails here, not
    after the model's weights are read."""
    from dite.engine.loading.hub import looks_like_repo_id

    if value is not None and not Path(os.path.expanduser(value)).exists() and not looks_like_repo_id(value):
        raise InputError(f"{flag} {value}: no such file or folder (and not a hub repo id like 'owner/name')")


def _check_accel(spec: str | None) -> None:
    """Parse an --accel spec now (unknown methods, parameters, values, parentheses) so that a
    typo fails before the model loads; its settings are checked against the model later."""
    if spec is None:
        return
    import dataclasses

    from dite.accel.build import as_methods

    try:
        methods = as_methods(spec)
    except DiteError as exc:
        raise ConfigError(f"--accel {spec!r}: {exc}") from None
    for method in methods:
        for field in dataclasses.fields(method):
            value = getattr(method, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--accel {spec!r}: {method.name}: {field.name}={value} is not a finite number")


def _check_common(args, flag_model: str = "--model") -> None:
    """What every command that loads a model checks first: dtype, device, the model's path."""
    from dite.engine.loading.loader import demo_folder, parse_device, parse_dtype

    if args.dtype != "auto":
        parse_dtype(args.dtype)
    parse_device(args.device)
    if demo_folder(args.model) is None:
        _existing_or_hub(args.model, flag_model)


def _family(args) -> str | None:
    from dite.engine.checkpoints.recognise import peek_family

    return peek_family(args.model)


def _check_generate(args) -> list:
    """Everything about a generate run that can be refused without the model; returns its
    planned calls (engine/outputs/jobs.py), each with its output paths."""
    if args.model is None:  # the demo models shipped with dite: offline, seconds on a CPU
        args.model = "demo-dit" if args.class_label and not args.prompt else "demo-sd3"
    _check_common(args)
    if args.scheduler is not None:
        _check_scheduler_name(args.scheduler)
    executor_options = {"--compile-backend": ("compiled", args.compile_backend),
                        "--compile-mode": ("compiled", args.compile_mode), "--npu-route": ("npu-graph", args.npu_route)}
    for flag, (executor, value) in executor_options.items():
        if value is not None and args.executor != executor:
            raise InputError(f"{flag} applies to --executor {executor}, not {args.executor}")
    _existing_or_hub(args.vae, "--vae")
    _existing_or_hub(args.tokenizers, "--tokenizers")
    args.model_config = _model_config(args.model_config)
    args.labels = _labels(args.class_label)
    if args.prompt and args.labels:
        raise InputError("give prompts (text-to-image models) or --class-label IDs (DiT), not both")
    if args.prompt_file is not None and (args.prompt or args.labels):
        raise InputError("give prompts (or --class-label) on the command line or in --prompt-file, not both")
    return _plan_generate(args, _family(args))


def _plan_generate(args, family: str | None) -> list:
    """The run's calls and output paths, checked: prompt-file lines, accel specs, seeds, paths."""
    from dite.engine.outputs import naming
    from dite.engine.outputs.jobs import plan_jobs
    from dite.engine.outputs.prompt_file import read_prompt_file

    entries = None
    if args.prompt_file is not None:
        entries = read_prompt_file(args.prompt_file, {"seed": _seed_or_random, "size": _size, "steps": _steps,
                                                      "guidance": _finite()})
        stand_in = ["0"] if family == "dit" else []  # the file gives what the command line does not
        if family is not None:
            _check_conditioning(argparse.Namespace(**{**vars(args), "class_label": stand_in,
                                                      "prompt": [] if stand_in else ["-"]}), family)
    elif family is not None:
        _check_conditioning(args, family)
    elif not args.prompt and not args.labels:
        raise InputError("nothing to generate: give a prompt (text-to-image models) or --class-label ID (DiT)")
    _check_skip_layers(args, family)
    base = naming.output_base(args.output)  # before anything else about outputs: the suffix decides the format
    jobs = plan_jobs(args, entries, family == "dit", MAX_SEED)
    for spec in dict.fromkeys(job.accel for job in jobs):
        _check_accel(spec)
    fields, index = [], 0
    for job in jobs:
        fields += job.image_fields(index)
        index += job.images
    paths = naming.image_paths(base, fields, args.name_pattern)
    index = 0
    for job in jobs:
        job.paths, index = paths[index:index + job.images], index + job.images
    check_writable(paths)
    naming.refuse_existing(paths, args.overwrite)
    for images in dict.fromkeys(job.images for job in jobs):  # an init image serves every call of the run
        _check_init_image(args, family, images)
    if args.lora:  # each LoRA file read and checked before the model loads (engine/lora)
        from dite.engine.lora.merge import check_lora_list

        check_lora_list(args.lora)
    return jobs


TEXT_ONLY = {"negative_prompt": "--negative-prompt", "max_sequence_length": "--max-sequence-length",
             "no_t5": "--no-t5", "tokenizers": "--tokenizers"}


def _check_init_image(args, family: str | None, count: int) -> None:
    """--init-image / --strength / --mask, read and checked before the model loads (a DiT's
    --mask is refused here when the family can be told, else by the pipeline)."""
    from dite.engine.pipelines import init_image

    width, height = args.size if args.size else (None, None)
    init_image.check(args.init_image, args.strength, args.mask, count=count, height=height, width=width,
                     masks=family != "dit", family=family or "")


def _check_skip_layers(args, family: str | None) -> None:
    """--skip-layers and its --slg-* options (the block indices are checked against the model
    once it is loaded, before the first call)."""
    given = [flag for flag in ("--slg-scale", "--slg-start", "--slg-stop")
             if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.skip_layers is None:
        if given:
            raise InputError(f"{', '.join(given)} apply with --skip-layers (skip-layer guidance); give the blocks "
                             "to skip, e.g. --skip-layers 7,8,9")
        return
    if family is not None and family != "sd3":
        raise InputError(f"--skip-layers (skip-layer guidance) is for SD3 / SD3.5 models; this is {family}")
    if args.guidance is not None and args.guidance <= 1:
        raise InputError(f"--skip-layers needs classifier-free guidance, and --guidance is {args.guidance}; "
                         "use a guidance above 1")
    from dite.engine.runtime.slg import DEFAULT_SCALE, DEFAULT_START, DEFAULT_STOP, SkipLayerGuidance

    start = DEFAULT_START if args.slg_start is None else args.slg_start
    stop = DEFAULT_STOP if args.slg_stop is None else args.slg_stop
    SkipLayerGuidance.check(args.skip_layers, DEFAULT_SCALE if args.slg_scale is None else args.slg_scale,
                            start, stop, depth=None)


def _check_conditioning(args, family: str) -> None:
    """Prompts for text-to-image models, class labels for DiT, and the options of each."""
    if family == "dit":
        if args.prompt:
            raise InputError("this is a class-conditional DiT: give --class-label ID (one per image), not a prompt")
        given = [flag for name, flag in TEXT_ONLY.items() if getattr(args, name) not in (None, False)]
        if args.images_per_prompt != 1:
            given.append("--images-per-prompt")
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise InputError(f"{', '.join(given)} {verb} to text-to-image models; this is a class-conditional DiT "
                             "(one image per --class-label)")
        if not args.class_label:
            raise InputError("this is a class-conditional DiT: give --class-label ID (one per image)")
    else:
        if args.class_label:
            raise InputError(f"this is a text-to-image model ({family}): give a prompt, not --class-label")
        if not args.prompt:
            raise InputError(f"this is a text-to-image model ({family}): give a prompt")
        if args.no_t5 and family != "sd3":
            raise InputError(f"--no-t5 is for SD3; {family} needs its T5")


def _check_scheduler_name(name: str) -> None:
    from dite.schedulers import ALIASES, BY_NAME

    if name not in BY_NAME and name not in ALIASES:
        raise InputError(f"--scheduler {name!r} is unknown; choose one of {', '.join(sorted({*BY_NAME, *ALIASES}))}")


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def step_memory(pipe, height: int, width: int, images: int, guided: bool, text_tokens: int = 0) -> int:
    """Estimated peak bytes of one denoising step (or of decoding, if more) at this size.

    Attention is counted as the math path computes it: a rows x heads x L x L score matrix
    and its softmax (SDPA on a CPU may need less; the estimate errs high). Block activations
    ~12 x rows x L x width; decoding: the VAE's first level at full size, plus its mid-block
    attention over the latent pixels."""
    import torch

    cfg = pipe.transformer.config
    factor = pipe.vae_scale_factor
    latent = (height // factor) * (width // factor)
    tokens = latent // (cfg.patch_size ** 2)
    joint = tokens + (text_tokens if pipe.family == "sd3" else 0)
    rows = images * (2 if guided else 1)
    item = torch.finfo(pipe.dtype).bits // 8
    step = rows * cfg.num_heads * joint ** 2 * item * 2 + rows * joint * cfg.hidden_size * item * 12
    vae = pipe.vae.config
    decode = images * height * width * vae.block_out_channels[0] * 4 * 3
    if vae.mid_block_add_attention:
        decode += images * latent ** 2 * 4 * 2
    return max(step, decode)


def _check_against_model(pipe, args, images: int, text_tokens: int = 0) -> None:
    """After loading, before generating: steps against the scheduler's training steps, the
    size against the model's position table and against the memory one step needs."""
    from dite.engine.families import BY_NAME

    trained = getattr(getattr(pipe.scheduler, "config", None), "num_train_timesteps", None)
    if args.steps is not None and trained is not None and args.steps > trained:
        raise InputError(f"--steps {args.steps} is more than the scheduler's {trained} training timesteps")
    cfg = pipe.transformer.config
    factor = pipe.vae_scale_factor
    default = (cfg.input_size if pipe.family == "dit" else cfg.sample_size) * factor
    width, height = args.size if args.size else (default, default)
    table = getattr(cfg, "pos_embed_max_size", None)
    if table is not None:
        side = table * cfg.patch_size * factor
        if max(width, height) > side:
            raise InputError(f"--size {width}x{height} is beyond this model's position table ({table} patches a "
                             f"side): at most {side}x{side} pixels")
    guidance = args.guidance if args.guidance is not None else pipe.defaults.get(
        "guidance_scale", BY_NAME[pipe.family].default_guidance)
    if pipe.device.type != "cpu":
        return
    need, free = step_memory(pipe, height, width, images, guidance > 1.0, text_tokens), available_memory()
    if free is not None and need > free:
        raise InputError(f"{images} image(s) at {width}x{height} need about {need / 2**30:.1f} GiB for one step, "
                         f"and {free / 2**30:.1f} GiB of RAM is available: use a smaller --size or fewer images")


def _text_tokens(pipe, args) -> int:
    """SD3's joint attention sees CLIP's 77 tokens plus T5's."""
    from dite.engine.families import BY_NAME

    if pipe.family != "sd3":
        return 0
    length = getattr(args, "max_sequence_length", None) or pipe.defaults.get("max_sequence_length") or \
        BY_NAME["sd3"].default_sequence_length
    return 77 + length


def cmd_generate(args) -> int:
    import time

    started = time.perf_counter()
    jobs = _check_generate(args)  # before anything is loaded
    if (args.nproc or args.parallel) and getattr(args, "parallel_rank", None) is None:
        from dite.engine.parallel.launch import generate_in_ranks

        if args.seed == -1:  # drawn once here: every rank must use the same seed
            args.seed = jobs[0].seed
        return generate_in_ranks(args, cmd_generate)  # each rank comes back here with parallel_rank set
    family_known = _family(args) is not None

    from dite.engine.outputs.run import load_for_generate, memory_options, run_jobs, run_metadata_of
    from dite.engine.runtime.accounting import FlopCounts, flop_cache_folder
    from dite.engine.runtime.progress import Reporter, reporting

    components = {"text_encoder_3": None} if args.no_t5 else {}
    options = {k: v for k, v in (("backend", args.compile_backend), ("mode", args.compile_mode),
                                 ("route", args.npu_route)) if v is not None}
    show = _show_progress(args)
    with reporting(Reporter() if show else None):
        if show:
            print(f"loading {args.model} (dtype {args.dtype}, {args.device})", file=sys.stderr, flush=True)
        pipe = load_for_generate(args, options, components)
        memory_options(pipe, args, len(jobs))
        # The summary line's FLOPs, counted once per model and call shape and kept for later runs.
        pipe.flop_counts = FlopCounts(flop_cache_folder())
        if args.vae_dtype is not None:
            from dite.engine.dtypes import precisions

            pipe.vae.to(precisions()[args.vae_dtype])
        load_seconds = time.perf_counter() - started
        _check_conditioning(args if args.prompt_file is None else argparse.Namespace(
            **{**vars(args), "class_label": ["0"] if pipe.family == "dit" else [],
               "prompt": [] if pipe.family == "dit" else ["-"]}), pipe.family)
        if not family_known:  # a hub model's family is known only now
            jobs = _plan_generate(args, pipe.family)
        for job in jobs:
            _check_against_model(pipe, argparse.Namespace(**{**vars(args), "size": job.size, "steps": job.steps,
                                                             "guidance": job.guidance}),
                                 job.images, _text_tokens(pipe, args))
        run_meta = run_metadata_of(pipe, args)
        if show:
            print(f"loaded in {load_seconds:.2f} s: {pipe.family}, {run_meta['dtype']} (VAE {run_meta['vae_dtype']}) "
                  f"on {run_meta['device']}", file=sys.stderr, flush=True)
        run_jobs(pipe, jobs, args, run_meta, load_seconds, started,
                 write=not getattr(args, "parallel_rank", None))  # parallel: rank 0 writes the images
    return 0


def _show_progress(args) -> bool:
    """Stage lines and loading bars go to a terminal only (a log or a pipe gets the summary)."""
    return not args.quiet and sys.stderr.isatty()


def _from_image_args(argv: list[str] | None, args):
    """`generate --from-image X`: the command line parsed again with X's recorded settings as
    the defaults (engine/outputs/rerun.py)."""
    from dite.engine.outputs.rerun import check_needed_paths, recorded_defaults

    defaults, params = recorded_defaults(args.from_image, args.model)
    needs = {key: defaults.pop(key) for key in list(defaults) if key.startswith("needs_")}
    if "vae_dtype" in params:
        from dite.engine.dtypes import LONG_NAMES

        defaults["vae_dtype"] = LONG_NAMES.get(params["vae_dtype"], params["vae_dtype"])
    parser = build_parser()
    parser.generate_parser.set_defaults(**defaults)
    again = parser.parse_args(argv)
    check_needed_paths(again, needs, args.from_image)
    again.recorded_model_hash = params.get("model_hash")
    return again


def cmd_calibrate(args) -> int:
    if args.model is None:
        args.model = "demo-dit" if args.class_label else "demo-sd3"
    _check_common(args)
    labels = _labels(args.class_label)
    family = _family(args)
    if family == "dit" and args.prompt:
        raise InputError("this is a class-conditional DiT: calibrate it with --class-label ID (repeat), not --prompt")
    if family not in (None, "dit") and args.class_label:
        raise InputError(f"this is a text-to-image model ({family}): calibrate it with --prompt, not --class-label")
    check_writable([Path(args.output)])

    from dite.engine.loading.loader import load
    from dite.engine.runtime.calibrate import calibrate

    pipe = load(args.model, device=args.device, dtype=args.dtype)
    if pipe.family == "dit" and args.prompt:
        raise InputError("this is a class-conditional DiT: calibrate it with --class-label ID (repeat), not --prompt")
    if pipe.family != "dit" and args.class_label:
        raise InputError(f"this is a text-to-image model ({pipe.family}): calibrate it with --prompt, "
                         "not --class-label")
    images = len(labels or args.prompt or []) or args.calib
    _check_against_model(pipe, args, images, _text_tokens(pipe, args))
    width, height = args.size if args.size else (None, None)
    plan = calibrate(pipe, args.output, steps=args.steps, threshold=args.threshold, window=args.window,
                     n_calib=args.calib, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                     prompts=args.prompt, class_labels=labels, metric=args.metric,
                     max_signatures=args.max_signatures, height=height, width=width)
    counts = ", ".join(f"{k} {v}" for k, v in plan["counts"].items() if v)
    print(f"{args.output}: {plan['signatures']} distinct step plans; {counts}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    """`dite tune`: the search of engine/runtime/tune.py on calibration inputs, written to -o."""
    import time

    if args.model is None:
        args.model = "demo-dit" if args.class_label else "demo-sd3"
    _check_common(args)
    if args.prompts is not None and args.class_label:
        raise InputError("give --prompts (text-to-image models) or --class-label (DiT), not both")
    if Path(args.output).suffix.lower() != ".json":
        raise InputError(f"--output {args.output}: a tuned file is JSON; give a path ending in .json")
    check_writable([Path(args.output)])
    from dite.engine.runtime.tune import FAMILIES, read_prompts, tune, write_tuned

    methods = FAMILIES if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or set(methods) - set(FAMILIES):
        raise InputError(f"--methods {args.methods!r}: give some of {', '.join(FAMILIES)}, comma-separated")
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    family = _family(args)
    if family == "dit" and prompts:
        raise InputError("this is a class-conditional DiT: tune it with --class-label ID (repeat), not --prompts")
    if family not in (None, "dit") and args.class_label:
        raise InputError(f"this is a text-to-image model ({family}): tune it with --prompts, not --class-label")
    for plan in args.fastattn_plan:
        from dite.accel.fastattn import read_plan

        read_plan(plan)
    from dite.engine.loading.loader import load

    start = time.perf_counter()
    pipe = load(args.model, device=args.device, dtype=args.dtype)
    images = len(args.class_label or prompts or []) or args.calibration
    _check_against_model(pipe, args, images, _text_tokens(pipe, args))
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    data = tune(pipe, args.budget, steps=args.steps, guidance=args.guidance, size=args.size, prompts=prompts,
                class_labels=_labels(args.class_label), calibration=args.calibration, screen=args.screen,
                metric=args.metric, fastattn_plans=args.fastattn_plan, seed=args.seed,
                negative_prompt=args.negative_prompt, methods=methods, log=log)
    write_tuned(args.output, data)
    fewer = data["fewer_steps"]
    baseline = f"; fewer steps ({fewer['steps']}): {fewer['psnr_db']:.2f} dB" if fewer else ""
    chosen = data["spec"] if data["spec"] != "none" else f"plain, {data['steps']} of {data['valid_for']['steps']} steps"
    print(f"chose {chosen}: {data['psnr_db']:.2f} dB at {args.metric} "
          f"{data['compute_fraction' if args.metric == 'compute' else 'flops_ratio']:.3f} (budget {args.budget})"
          f"{baseline}; {data['search']['runs']} runs, tuned in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(args.output)
    return 0


def cmd_accel(args) -> int:
    from dite.accel.describe import describe_methods, format_methods

    print(json.dumps(describe_methods(), indent=2, default=str) if args.json else format_methods())
    return 0


def _model_config(text: str | None) -> dict | None:
    """--model-config (generate, convert, inspect): a JSON object, or the path of a file
    holding one; anything else is one error naming the option."""
    if text is None:
        return None
    if isinstance(text, dict):  # already parsed
        return text
    if not text.strip():
        raise InputError("--model-config is empty: give a JSON object such as '{\"num_heads\": 16}' or a file "
                         "holding one")
    if Path(text).is_file():
        from dite.engine.loading.config_files import read_config

        return dict(read_config(Path(text), "--model-config file"))
    if not text.lstrip().startswith(("{", "[")):
        raise InputError(f"--model-config {text}: no such file, and not a JSON object such as '{{\"num_heads\": 16}}'")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--model-config is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"--model-config must be a JSON object ({{...}}), not a {type(value).__name__}")
    return value


def cmd_convert(args) -> int:
    import warnings

    from dite.engine.checkpoints.convert import convert
    from dite.engine.checkpoints.recorded import parse_model_config

    model_config = parse_model_config(args.model_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert(args.source, args.destination, to=args.to, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, components=args.components, force=args.force,
                         tokenizers=args.tokenizers, vae=args.vae, text_encoders=args.text_encoders,
                         model_config=model_config)
    for warning in caught:
        print(f"dite: note: {warning.message}", file=sys.stderr)
    for path in result.files:
        print(path)
    return 0


def cmd_inspect(args) -> int:
    from dite.engine.checkpoints.inspect import inspect_source
    from dite.engine.checkpoints.recorded import parse_model_config

    info = inspect_source(args.source, model_config=parse_model_config(args.model_config))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print_tree(info)
    return 0


def print_tree(value, indent: int = 0) -> None:
    """Nested dicts as indented `key: value` lines; inspect's problem keys one per line."""
    pad = "  " * indent
    for key, item in value.items():
        if isinstance(item, dict) and item and key != "config":
            print(f"{pad}{key}:")
            print_tree(item, indent + 1)
        elif key in ("missing", "unexpected", "misshaped") and item:
            print(f"{pad}{key}:")
            for entry in item:
                text = (f"{entry['key']} is {tuple(entry['shape'])}, expected {tuple(entry['expected'])}"
                        if isinstance(entry, dict) and "expected" in entry else entry)
                print(f"{pad}  - {text}")
        else:
            print(f"{pad}{key}: {item}")


def _cmd_serve(args) -> int:
    from dite.engine.serve.command import cmd_serve

    return cmd_serve(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad argument (already reported in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    try:
        if args.command == "generate" and args.from_image is not None:
            args = _from_image_args(argv, args)
        return {"generate": cmd_generate, "inspect": cmd_inspect, "accel": cmd_accel, "calibrate": cmd_calibrate,
                "convert": cmd_convert, "tune": cmd_tune, "serve": _cmd_serve}[args.command](args)
    except DiteError as exc:
        if os.environ.get("DITE_DEBUG"):
            raise
        print(f"dite: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
