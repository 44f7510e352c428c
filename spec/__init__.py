"""The framework-neutral spec: one Markdown document per algorithm and golden vectors in vectors/."""

from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent
VECTORS_DIR = SPEC_DIR / "vectors"
