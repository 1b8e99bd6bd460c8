"""Hugging Face safetensors -> polar-jax checkpoint conversion (no torch)."""

from convert.hf import HFReader, convert_checkpoint

__all__ = ["HFReader", "convert_checkpoint"]
