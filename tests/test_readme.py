"""The README's NumPy example runs as written (the Trainer example needs a hub model, so only the losses one)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_losses_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(block for block in blocks if "from aha.algos import grpo" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert "kl" in capsys.readouterr().out
