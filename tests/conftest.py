import sys
from pathlib import Path

# tests/tiny.py holds the reference-model factories shared by the test files.
sys.path.insert(0, str(Path(__file__).parent))
