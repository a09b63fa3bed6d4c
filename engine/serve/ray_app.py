"""The same app as Ray Serve replicas: `dite serve --ray --replicas N`.

Each replica is a Ray actor that loads its own pipeline and runs the whole app of app.py
(its own batcher, queue limit, timeouts and /metrics); Ray Serve's HTTP proxy spreads
requests over the replicas. A replica takes `num_cpus` CPUs, or one GPU when the model is
on CUDA, from the Ray cluster it is placed on.
"""

from __future__ import annotations

import os
import sys


def replica_class():
    """The deployment class (built on use: importing this module imports no ray)."""
    from ray import serve

    @serve.ingress()
    class DiteReplica:
        def __init__(self, load_kwargs: dict, served_name: str, options):
            from dite.engine.loading.loader import load

            settings = dict(load_kwargs)
            self.pipe = load(settings.pop("source"), **settings)
            self.served_name, self.options = served_name, options

        def __serve_build_asgi_app__(self):
            from dite.engine.serve.app import create_app

            return create_app(self.pipe, self.served_name, self.options)

    return DiteReplica


def application(load_kwargs: dict, options, served_name: str, replicas: int, num_cpus: float = 1.0):
    """The bound Ray Serve application: `replicas` copies of the app."""
    from ray import serve

    device = str(load_kwargs.get("device", "cpu"))
    resources = {"num_gpus": 1} if device.startswith("cuda") else {"num_cpus": num_cpus}
    deployment = serve.deployment(
        replica_class(), name="dite", num_replicas=replicas, ray_actor_options=resources,
        # Each replica's own queue (--max-queue) answers 429; Ray must not refuse first.
        max_ongoing_requests=options.max_queue + options.max_batch)
    return deployment.bind(load_kwargs, served_name, options)


def run_replicas(load_kwargs: dict, options, *, host: str, port: int, replicas: int, address: str | None,
                 served_name: str | None = None) -> int:
    """Start (or join) Ray, serve the app on host:port until interrupted."""
    import ray
    from ray import serve

    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    if served_name is None:  # what image metadata records for the source, as one process serves it
        from dite.engine.loading.loader import recorded_name

        served_name = recorded_name(load_kwargs["source"])
    print(f"dite serve: {served_name} as {replicas} Ray Serve replica(s) on http://{host}:{port}", file=sys.stderr)
    try:
        serve.run(application(load_kwargs, options, served_name, replicas), name="dite", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
