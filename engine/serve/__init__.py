"""`dite serve`: an OpenAI-compatible image server over one loaded pipeline.

app.py (routes), validation.py (request bodies -> jobs, OpenAI-style errors), batcher.py
(queue, batching, limits, cancellation), runner.py (one batch on the pipeline), files.py
(images served by URL for a while), metrics.py (Prometheus text), page.py (the web page),
server.py (uvicorn, in a thread or in the foreground), ray_app.py (Ray Serve replicas),
command.py (the `dite serve` arguments and command).
Nothing here is imported by `import dite.engine`; fastapi and uvicorn are the `serve` extra.
"""
