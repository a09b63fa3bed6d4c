"""`dite serve`: its arguments and what it does. engine/cli.py registers both; fastapi,
uvicorn (the `serve` extra) and ray (the `ray` extra) are imported only when it runs."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys

from dite.engine.errors import DiteError, InputError


class MissingExtraError(DiteError, RuntimeError):
    """A feature's optional dependencies are not installed."""


def add_parser(sub, *, positive, finite, lora_spec) -> None:
    srv = sub.add_parser("serve", help="an OpenAI-compatible image server (POST /v1/images/generations, "
                                       "/v1/images/edits) with request batching")
    srv.add_argument("--model", default="demo-sd3", help="as for generate (default: demo-sd3)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                                                         "only; 0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model id clients see and send (default: the name image metadata records, e.g. "
                          "demo-sd3, a hub id, or a local folder's name without its path)")
    srv.add_argument("--accel", default=None, metavar="SPEC", help="accel spec for requests that name none")
    srv.add_argument("--max-batch", type=positive, default=8,
                     help="most images per pipeline call (1 turns batching off; default 8)")
    srv.add_argument("--batch-wait-ms", type=finite(0.0), default=20.0,
                     help="how long the oldest queued request waits for compatible ones (default 20)")
    srv.add_argument("--max-queue", type=positive, default=64,
                     help="requests waiting at most; more get 429 with Retry-After (default 64)")
    srv.add_argument("--timeout-s", type=finite(0.0), default=120.0,
                     help="a request's limit from arrival; past it: 504 and its work cancelled (default 120)")
    srv.add_argument("--url-ttl-s", type=finite(0.0), default=600.0,
                     help='how long images asked for as response_format "url" stay available (default 600)')
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--dtype", default="fp32")
    srv.add_argument("--scheduler", default=None, help="replace the model's scheduler (as for generate)")
    srv.add_argument("--executor", default="eager", choices=["eager", "compiled", "npu-graph"])
    srv.add_argument("--attention", default="sdpa", choices=["sdpa", "math", "npu"])
    srv.add_argument("--no-t5", action="store_true", help="SD3 without T5")
    srv.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="PATH[:SCALE]",
                     help="merge a LoRA at start-up (as for generate; repeatable); requests cannot change it: the "
                          "merged weights are shared by every request")
    srv.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas (the `ray` extra)")
    srv.add_argument("--replicas", type=positive, default=1, help="--ray: replicas, each with its own pipeline")
    srv.add_argument("--ray-address", default=None,
                     help="--ray: the cluster to join (default: RAY_ADDRESS, else a local Ray instance)")


def require(modules: tuple[str, ...], extra: str) -> None:
    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a broken or blocked installation
            return True

    missing = [m for m in modules if absent(m)]
    if missing:
        raise MissingExtraError(f"dite serve{' --ray' if extra == 'ray' else ''} needs {', '.join(missing)}: "
                                f"pip install 'dite[{extra}]'")


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise InputError(f"--port {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or "
                             "--host") from None


def options_of(args):
    from dite.engine.serve.app import ServeOptions

    return ServeOptions(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                        timeout_s=args.timeout_s, accel=args.accel, url_ttl_s=args.url_ttl_s)


def load_args(args) -> dict:
    """load() arguments from the command line (also what each Ray replica loads with)."""
    return dict(source=args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                executor=args.executor, attention=args.attention,
                **({"text_encoder_3": None} if args.no_t5 else {}),
                **({"loras": args.lora} if args.lora else {}))  # load() checks the files before reading the model


def cmd_serve(args) -> int:
    require(("fastapi", "uvicorn", "python_multipart"), "serve")  # python-multipart: /v1/images/edits forms
    if args.accel:
        from dite.accel.spec import parse_spec

        parse_spec(args.accel)  # a malformed spec: one line before anything is loaded
    if args.lora:  # each file read and checked here, before Ray starts or the model loads
        from dite.engine.lora.merge import check_lora_list

        check_lora_list(args.lora)
    if args.ray:
        require(("ray",), "ray")
        from dite.engine.serve.ray_app import run_replicas

        return run_replicas(load_args(args), options_of(args), host=args.host, port=args.port,
                            replicas=args.replicas, address=args.ray_address, served_name=args.served_model_name)
    if args.replicas != 1:
        raise InputError("--replicas needs --ray (one process serves one pipeline)")
    _check_port(args.host, args.port)
    from dite.engine.loading.loader import load
    from dite.engine.serve.app import create_app
    from dite.engine.serve.server import serve_forever

    settings = load_args(args)
    pipe = load(settings.pop("source"), **settings)
    name = args.served_model_name or pipe.model_name
    loras = "".join(f", LoRA {path}:{scale:g}" for path, scale in args.lora or ())
    print(f"dite serve: {name} ({pipe.family}{loras}) on http://{args.host}:{args.port}", file=sys.stderr)
    serve_forever(create_app(pipe, name, options_of(args)), args.host, args.port)
    return 0
