"""Progress covers the wait: loading (tensor by tensor), encoding, denoising, decoding; the
summary line gives load time and total; nothing is reported without a reporter."""

from __future__ import annotations

import io
import re

from dite.engine import cli
from dite.engine.cli import main
from dite.engine.loading.loader import load
from dite.engine.runtime.progress import Reporter, reporting, track


def test_stages_report_to_an_installed_reporter_only():
    stream = io.StringIO()
    with reporting(Reporter(stream)):
        pipe = load("demo-dit")
        pipe(class_labels=[1], num_inference_steps=1, progress=False)
    text = stream.getvalue()
    assert "load DiT" in text and "load AutoencoderKL" in text and "tensor" in text
    assert re.search(r"encode \.\.\. \d+\.\d\d s\n", text) and re.search(r"decode \.\.\. \d+\.\d\d s\n", text)
    assert "denoise ..." not in text  # denoising has its own step bar (progress=True)
    items = [1, 2]
    assert track(items, 2, "load") is items  # no reporter: the items as they are, no bar
    with reporting(Reporter(stream)):
        assert track(items, 2, "load") is not items


def test_cli_progress_on_a_terminal_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_show_progress", lambda args: True)
    assert main(["generate", "--class-label", "1", "--steps", "2", "--dtype", "fp32", "-o", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "loading demo-dit (dtype fp32, cpu)" in err and "loaded in" in err and "float32 (VAE float32)" in err
    assert "encode ..." in err and "decode ..." in err and "denoise" in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("1 image(s), 2 steps |")
    assert re.search(r"\| load \d+\.\d\ds \| total \d+\.\d\ds$", summary), summary
