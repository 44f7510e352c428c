"""aha: RL post-training for LLMs with losses you can trust to the last digit.

The package is a namespace over the repository's top-level folders (see pyproject.toml):
``aha.algos`` (pure loss functions), ``aha.spec`` (the documents and golden vectors),
``aha.backends.jax`` (the float64 reference), ``aha.backends.torch`` (the production backend)
and ``aha.conformance`` (the suite that holds them together).
"""

__version__ = "0.1.0"
