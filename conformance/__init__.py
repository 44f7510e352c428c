"""The conformance suite: every algorithm × config variant × shape × edge case, across backends.

`python -m aha.conformance` (or `aha conformance`) runs it; see cli.py. `check_target` (targets.py) runs the same
cases against another implementation through an adapter (adapters/). The JAX reference evaluates
tiny graphs op by op, so XLA compile time dominates its cost. Unless the caller configured them, ask
XLA for its cheapest compile pipeline (read when JAX's CPU backend starts) and keep compiled primitives
in a persistent cache (~/.cache/aha/jax, or $XDG_CACHE_HOME/aha/jax), which makes a second run fast.
"""
import os
import sys

_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aha", "jax")
_CACHE_SETTINGS = {
    "jax_compilation_cache_dir": _CACHE,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()
if "jax" in sys.modules:  # imported already: configure it directly (effective until its first compile)
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        for _name, _value in _CACHE_SETTINGS.items():
            jax.config.update(_name, _value)
else:
    for _name, _value in _CACHE_SETTINGS.items():
        os.environ.setdefault(_name.upper(), str(_value))


def __getattr__(name):
    """`aha.conformance.check_target` (targets.py), imported on first use: it loads JAX and the registry."""
    if name == "check_target":
        from .targets import check_target

        return check_target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
