"""The embedded default task of `make demo`: two-digit addition, verifiable exactly.

`build_demo_model()` returns a cached `save_pretrained` folder holding a tiny Llama model,
pre-trained to answer in the <think>…</think><answer>…</answer> format but greedily right only
about 30% of the time (task.py explains the design), so that GRPO visibly improves it.
`python -m aha.backends.torch.demo` builds it (or finds it cached) and prints what the build measured.
"""

from .build import DemoRecipe, build_demo_model, build_info
from .evaluate import evaluate_accuracy
from .task import TRAIN_ROWS, demo_dataset, write_jsonl
from .tokenizer import build_tokenizer

__all__ = ["TRAIN_ROWS", "DemoRecipe", "build_demo_model", "build_info", "build_tokenizer", "demo_dataset",
           "evaluate_accuracy", "write_jsonl"]
