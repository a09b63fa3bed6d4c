"""Recognising, inspecting and converting checkpoint files. Never imports dite.engine.pipelines
or dite.engine.runtime (tests/test_import_direction.py)."""
