"""Helpers for scripts/train_tiny_model.py: tokenizer, training-sample adapter, attention supervision."""
