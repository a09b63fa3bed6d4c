import sys
from pathlib import Path

import pytest

# tests/tiny*.py hold the reference-model factories shared by the test files.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    """The tiny SD3 pipeline of tests/tiny_sd3.py, saved in diffusers' layout: (reference, folder).
    Shared by the SD3 test files (building it trains two tokenizers)."""
    from tiny_sd3 import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))
