"""The conformance suite: every algorithm × config variant × shape × edge case, across backends.

`python -m aha.conformance` (or `aha conformance`) runs it; see cli.py. The JAX reference evaluates
tiny graphs op by op, so XLA compile time dominates its cost: unless the caller configured them, ask
XLA for its cheapest compile pipeline and keep compiled primitives in a persistent cache
(~/.cache/aha/jax, or $XDG_CACHE_HOME/aha/jax). Both must be set before JAX initializes.
"""
import os
import sys

if "jax" not in sys.modules:
    _cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aha", "jax")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                                   " --xla_llvm_disable_expensive_passes=true").strip()
