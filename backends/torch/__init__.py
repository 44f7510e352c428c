"""Torch production backend."""
