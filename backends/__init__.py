"""Backends: ``jax`` (float64 reference) and ``torch`` (production). Each imports ``aha.algos``."""
