"""`python -m aha.backends.torch.demo [--force] [--rows N]`: build (or reuse) the demo model and
report its build time and held-out greedy accuracy before any RL."""

import argparse
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from . import build_demo_model, build_info, demo_dataset, evaluate_accuracy

parser = argparse.ArgumentParser(prog="python -m aha.backends.torch.demo", description=__doc__)
parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
parser.add_argument("--rows", type=int, default=0, help="also score N fresh held-out rows (seed 1)")
args = parser.parse_args()

folder = build_demo_model(force=args.force)
print(f"demo model: {folder}")
print(json.dumps(build_info(folder), indent=2))
if args.rows:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    print(f"held-out greedy accuracy on {args.rows} more rows: "
          f"{evaluate_accuracy(model, tokenizer, demo_dataset('test', args.rows, seed=1)):.3f}")
