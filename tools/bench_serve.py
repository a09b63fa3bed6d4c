"""A bounded load test of `dite serve`: batching on against batching off.

    nice -n 10 python tools/bench_serve.py --requests 200 --clients 16 --steps 8 --out bench/serve

For each mode a real server (engine/serve, uvicorn in a thread on a free loopback port)
serves one loaded pipeline; CLIENTS threads post REQUESTS requests between them, each with
its own prompt and seed, as fast as answers come. Modes:

- `batching`: --max-batch (default 8) images per call, --batch-wait-ms window (default 20);
- `no batching`: --max-batch 1, every request its own call.

With --rounds R the modes run R times each, alternating, so that a change in the machine's
load falls on both. Reported per mode (all rounds pooled): requests answered 200, lost (sent
but not answered with their images), duplicated (an image seed answered twice, or a seed not
sent), latency p50 / p95 (send to answer, in the client), throughput (images per second of
wall time, median over rounds), mean images per pipeline call (the server's /metrics), and
the largest pixel difference of each request's image against the same request in the first
mode (batched images are their requests' own images to 1/255, README "Library").
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

PROMPTS = [f"a {colour} {shape} {place}" for colour in ("red", "yellow", "green", "cyan", "blue", "purple")
           for shape in ("circle", "square", "triangle") for place in ("on the left", "in the middle", "on the right")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _pixels(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def run_mode(pipe, name: str, model: str, options, bodies: list[dict], clients: int) -> dict:
    """Every body posted once from `clients` threads; what came back, and when."""
    import httpx

    from dite.engine.serve.app import create_app
    from dite.engine.serve.server import running

    answers: dict[int, list] = {}
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    with running(create_app(pipe, model, options)) as url:
        def client(mine: list[tuple[int, dict]]):
            with httpx.Client(base_url=url, timeout=600) as http:
                for index, body in mine:
                    start = time.perf_counter()
                    response = http.post("/v1/images/generations", json=body)
                    seconds = time.perf_counter() - start
                    with lock:
                        if response.status_code != 200:
                            failures.append(f"{index}: {response.status_code} {response.text[:200]}")
                            continue
                        latencies.append(seconds)
                        answers.setdefault(index, []).append(response.json())

        # Not counted: the pipeline's first call pays one-time costs (the model fingerprint).
        httpx.post(url + "/v1/images/generations", json={**bodies[0], "seed": 0}, timeout=600).raise_for_status()
        shares = [list(enumerate(bodies))[k::clients] for k in range(clients)]
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, shares))
        wall = time.perf_counter() - start
        metrics = httpx.get(url + "/metrics").text
    return {"mode": name, "answers": answers, "latencies": latencies, "failures": failures, "wall": wall,
            "metrics": metrics}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def check(run: dict, bodies: list[dict]) -> dict:
    """Lost: a request without exactly its n images; duplicated: an answer for a request
    answered twice, or an image whose seed or prompt is not its request's."""
    lost = duplicated = 0
    for index, body in enumerate(bodies):
        got = run["answers"].get(index, [])
        if not got:
            lost += 1
            continue
        duplicated += len(got) - 1
        data = got[0]["data"]
        seeds = [item["seed"] for item in data]
        field = "class_label" if "class_label" in body else "prompt"
        asked = [p[field] for p in got[0]["dite"]["parameters"]]
        if len(data) != body.get("n", 1):
            lost += 1
        if seeds != [body["seed"] + k for k in range(len(data))] or set(asked) != {body[field]}:
            duplicated += 1
    return {"lost": lost, "duplicated": duplicated}


def summarise(runs: list[dict], bodies: list[dict], reference: dict | None) -> dict:
    latencies = [s for run in runs for s in run["latencies"]]
    checks = [check(run, bodies) for run in runs]
    images = [sum(len(a[0]["data"]) for a in run["answers"].values()) for run in runs]
    batches = sum(_metric(run["metrics"], "dite_batches_total") for run in runs)
    served = sum(_metric(run["metrics"], "dite_batch_images_sum") for run in runs)
    diff = None
    if reference is not None:
        diff = 0
        for run in runs:
            for index, answers in run["answers"].items():
                if index in reference["answers"]:
                    a, b = answers[0]["data"][0]["b64_json"], reference["answers"][index][0]["data"][0]["b64_json"]
                    diff = max(diff, int(abs(_pixels(a) - _pixels(b)).max()))
    return {"mode": runs[0]["mode"], "requests": len(bodies) * len(runs),
            "ok": sum(len(run["answers"]) for run in runs),
            "failed": sum(len(run["failures"]) for run in runs),
            "lost": sum(c["lost"] for c in checks), "duplicated": sum(c["duplicated"] for c in checks),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "images_per_s": round(statistics.median(n / run["wall"] for n, run in zip(images, runs)), 3),
            "mean_batch_images": round(served / batches, 2) if batches else 0.0,
            "max_diff_vs_first_mode": diff, "failures": [f for run in runs for f in run["failures"]][:5]}


COLUMNS = ("mode", "requests", "ok", "lost", "duplicated", "p50_s", "p95_s", "images_per_s", "mean_batch_images",
           "max_diff_vs_first_mode")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-sd3")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if min(args.requests, args.clients, args.steps, args.max_batch, args.rounds) < 1:
        parser.error("--requests, --clients, --steps, --max-batch and --rounds must be at least 1")

    from dite.engine import load
    from dite.engine.serve.app import ServeOptions

    pipe = load(args.model)
    bodies = [{"prompt": PROMPTS[k % len(PROMPTS)], "seed": 1000 + k, "steps": args.steps}
              for k in range(args.requests)]
    if pipe.family == "dit":
        bodies = [{"class_label": k % 18, "seed": b["seed"], "steps": args.steps} for k, b in enumerate(bodies)]
    common = dict(max_queue=args.requests + 1, timeout_s=3600)
    modes = {"batching": ServeOptions(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, **common),
             "no batching": ServeOptions(max_batch=1, batch_wait_ms=0, **common)}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for round_index in range(args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
        for name in order:
            print(f"round {round_index + 1}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_mode(pipe, name, args.model, modes[name], bodies, args.clients))
    first = next(iter(modes))
    rows = [summarise(runs[name], bodies, None if name == first else runs[first][0]) for name in modes]
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        settings["load_average"] = os.getloadavg()[0]
        out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
