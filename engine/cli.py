"""The `dite` command line: generate, inspect, accel.

Every error the user can cause is one line on stderr and a non-zero exit code; tracebacks
are for bugs (set DITE_DEBUG=1 to see them for user errors too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dite.engine.errors import DiteError

EXIT_USER_ERROR = 2


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x256 (width x height), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dite", description="Diffusion transformer inference engine")
    parser.add_argument("--version", action="version", version=f"dite {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make images: text-to-image (SD3, PixArt) or class-to-image (DiT)")
    gen.add_argument("prompt", nargs="*", help="prompt(s) for text-to-image models; one image set per prompt")
    gen.add_argument("--model", default=None,
                     help="pipeline folder, checkpoint file, hub repo id, or demo-sd3 / demo-dit (the small models "
                          "shipped with dite). Default: demo-sd3 for a prompt, demo-dit for --class-label")
    gen.add_argument("--class-label", action="append", default=[], metavar="ID",
                     help="class index (or name, if the model has label names); repeat for several images")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from (text-to-image)")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--max-sequence-length", type=int, default=None,
                     help="T5 tokens (default: the model's recorded one, else SD3 256, PixArt-α 120, PixArt-Σ 300)")
    gen.add_argument("--no-t5", action="store_true", help="SD3 without T5 (low memory; its tokens become zeros)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the family's, DiT 50, SD3 28, PixArt 20)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the family's, DiT 4.0, SD3 7.0, PixArt 4.5)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k (default 0)")
    gen.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size (default: the model's)")
    gen.add_argument("--scheduler", default=None, help="replace the model's scheduler: ddim, ddpm, dpm (DPM-Solver++) or flow_euler (alias euler)")
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
    gen.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    gen.add_argument("-o", "--output", default="out.png", help="PNG path; several images get -0, -1, ... suffixes")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    cal = sub.add_parser("calibrate", help="calibrate a DiTFastAttn plan (use it with --accel fastattn(plan=FILE))")
    cal.add_argument("--model", default=None, help="as for generate (default: demo-sd3)")
    cal.add_argument("--steps", type=int, required=True, help="plans are specific to the step count")
    cal.add_argument("--threshold", type=float, default=0.05, help="loss threshold δ (the last layer's; grows with depth)")
    cal.add_argument("--window", type=int, required=True, help="band half-width w in tokens (N/8 in the reference)")
    cal.add_argument("--calib", type=int, default=4, help="calibration prompts / class labels")
    cal.add_argument("--prompt", action="append", default=None, help="calibration prompt (repeat); default: built-in")
    cal.add_argument("--class-label", action="append", default=None, metavar="ID",
                     help="calibration class label, index or name (repeat; DiT); default: seeded, from the named classes")
    cal.add_argument("--guidance", type=float, default=None)
    cal.add_argument("--negative-prompt", default="")
    cal.add_argument("--metric", default="relative", help="relative (the reference's) or ssim")
    cal.add_argument("--max-signatures", type=int, default=None,
                     help="merge steps into at most K distinct step plans (graph executors compile one per plan)")
    cal.add_argument("--size", type=_size, default=None, metavar="WxH")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="fp32")
    cal.add_argument("-o", "--output", required=True, help="plan file (JSON)")

    acc = sub.add_parser("accel", help="list the acceleration methods, their parameters and defaults")
    acc.add_argument("--json", action="store_true", help="machine-readable output")

    conv = sub.add_parser("convert", help="convert a checkpoint between the original and diffusers layouts")
    conv.add_argument("source", help="checkpoint file or folder")
    conv.add_argument("destination", help="folder (--to diffusers) or file (--to original)")
    conv.add_argument("--to", required=True, choices=["diffusers", "original"])
    conv.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                      help="cast floating tensors (default: keep each tensor's own)")
    conv.add_argument("--max-shard-size", default=None, metavar="SIZE",
                      help="largest weights file of a diffusers folder, e.g. 5GB (default: one file)")
    conv.add_argument("--components", default=None, metavar="NAMES",
                      help="comma-separated diffusers component names to convert (default: all)")
    conv.add_argument("--force", action="store_true", help="replace an existing destination")
    conv.add_argument("--tokenizers", default=None, metavar="PATH",
                      help="SD3 single file -> diffusers: folder holding tokenizer/, tokenizer_2/, tokenizer_3/")
    conv.add_argument("--vae", default=None, metavar="PATH", help="VAE to include (an original DiT .pt has none)")
    conv.add_argument("--text-encoders", default="bundled", choices=["bundled", "separate"],
                      help="SD3 -> original: encoders inside the file, or in text_encoders/ beside it")
    conv.add_argument("--model-config", default=None, metavar="JSON",
                      help="what shapes cannot tell, as load(model_config=...): a JSON string or file")

    ins = sub.add_parser("inspect", help="describe a model source without loading it")
    ins.add_argument("source")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--model-config", default=None, metavar="JSON",
                     help="what shapes cannot tell, as load(model_config=...): a JSON string or file")
    return parser


def _version() -> str:
    from dite.engine.pipeline import dite_version

    return dite_version()


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png") if path.suffix else path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


def cmd_generate(args) -> int:
    from dite.engine.accounting import summary_line
    from dite.engine.images import save_png
    from dite.engine.loader import load

    components = {"text_encoder_3": None} if args.no_t5 else {}
    if args.model is None:  # the demo models shipped with dite: offline, seconds on a CPU
        args.model = "demo-dit" if args.class_label and not args.prompt else "demo-sd3"
    options = {k: v for k, v in (("backend", args.compile_backend), ("mode", args.compile_mode),
                                 ("route", args.npu_route)) if v is not None}
    pipe = load(args.model, device=args.device, dtype=args.dtype, vae=args.vae, scheduler=args.scheduler,
                tokenizers=args.tokenizers, executor=args.executor, attention=args.attention,
                executor_options=options, **components)
    width, height = args.size if args.size else (None, None)
    common = dict(seed=args.seed, height=height, width=width, progress=not args.quiet, accel=args.accel)
    if args.steps is not None:
        common["num_inference_steps"] = args.steps
    if args.guidance is not None:
        common["guidance_scale"] = args.guidance
    if pipe.family == "dit":
        if args.prompt or not args.class_label:
            raise DiteError("this is a class-conditional DiT: give --class-label ID (one per image), not a prompt")
        labels = _labels(args.class_label)
        out = pipe(class_labels=labels, **common)
    else:
        if args.class_label or not args.prompt:
            raise DiteError(f"this is a text-to-image model ({pipe.family}): give a prompt, not --class-label")
        out = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt,
                   num_images_per_prompt=args.images_per_prompt, max_sequence_length=args.max_sequence_length,
                   **common)
    for image, params, path in zip(out.images, out.parameters, output_paths(args.output, len(out.images))):
        save_png(image, path, params)
        print(path)
    print(f"{len(out.images)} image(s), {out.parameters[0]['steps']} steps | {summary_line(out.stats, out.timings)}",
          file=sys.stderr)
    return 0


def _labels(values: list[str] | None) -> list[int | str] | None:
    """--class-label values: indices as ints, anything else a class name for the model's id2label."""
    return [int(x) if x.lstrip("-").isdigit() else x for x in values] if values else None


def cmd_calibrate(args) -> int:
    from dite.engine.calibrate import calibrate
    from dite.engine.loader import load

    default = "demo-dit" if args.class_label else "demo-sd3"
    pipe = load(args.model or default, device=args.device, dtype=args.dtype)
    if pipe.family == "dit" and args.prompt:
        raise DiteError("this is a class-conditional DiT: calibrate it with --class-label ID (repeat), not --prompt")
    if pipe.family != "dit" and args.class_label:
        raise DiteError(f"this is a text-to-image model ({pipe.family}): calibrate it with --prompt, not --class-label")
    width, height = args.size if args.size else (None, None)
    plan = calibrate(pipe, args.output, steps=args.steps, threshold=args.threshold, window=args.window,
                     n_calib=args.calib, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                     prompts=args.prompt, class_labels=_labels(args.class_label), metric=args.metric,
                     max_signatures=args.max_signatures, height=height, width=width)
    counts = ", ".join(f"{k} {v}" for k, v in plan["counts"].items() if v)
    print(f"{args.output}: {plan['signatures']} distinct step plans; {counts}", file=sys.stderr)
    return 0


def cmd_accel(args) -> int:
    from dite.accel.describe import describe_methods, format_methods

    print(json.dumps(describe_methods(), indent=2, default=str) if args.json else format_methods())
    return 0


def _model_config(text: str | None) -> dict | None:
    """--model-config: a JSON object, or a file holding one."""
    if not text:
        return None
    if Path(text).is_file():
        text = Path(text).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DiteError(f"--model-config is not valid JSON ({exc})") from None


def cmd_convert(args) -> int:
    import warnings

    from dite.engine.converter import convert

    model_config = _model_config(args.model_config)
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
    from dite.engine.inspect import inspect_source

    info = inspect_source(args.source, model_config=_model_config(args.model_config))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "inspect": cmd_inspect, "accel": cmd_accel, "calibrate": cmd_calibrate,
                "convert": cmd_convert}[args.command](args)
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
