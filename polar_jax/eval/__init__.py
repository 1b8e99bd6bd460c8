"""Evaluation: perplexity (dense and sparse), agreement with dense decoding."""
