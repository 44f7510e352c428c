"""Random float64 inputs for the algos tests: right-padded completions, contiguous groups, junk in padding."""
from __future__ import annotations

import numpy as np


def batch(seed: int, *, groups: int = 2, group_size: int = 3, length: int = 5, lengths=None, junk: float = 0.0):
    """A dict of NumPy arrays: logp, old_logp, ref_logp [B, T], mask [B, T] bool, advantages, rewards [B].

    ``lengths`` (default random in [1, T]) sets each row's active prefix; padding holds ``junk`` offsets.
    """
    rng = np.random.default_rng(seed)
    b = groups * group_size
    if lengths is None:
        lengths = rng.integers(1, length + 1, size=b)
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    logp = -rng.exponential(1.0, size=(b, length))
    old = logp + 0.3 * rng.standard_normal((b, length))
    ref = logp + 0.3 * rng.standard_normal((b, length))
    if junk:
        pad = ~mask
        logp = np.where(pad, junk * rng.standard_normal((b, length)), logp)
        old = np.where(pad, -junk * rng.standard_normal((b, length)), old)
        ref = np.where(pad, junk * rng.standard_normal((b, length)), ref)
    return {
        "logp": logp,
        "old_logp": old,
        "ref_logp": ref,
        "mask": mask,
        "advantages": rng.standard_normal(b),
        "rewards": rng.integers(0, 3, size=b).astype(float),
        "values": rng.standard_normal((b, length)),
        "old_values": rng.standard_normal((b, length)),
        "returns": rng.standard_normal((b, length)),
        "scores": rng.standard_normal(b),
    }


def pick(arrays: dict, *names: str) -> dict:
    return {name: arrays[name] for name in names}
