"""Whole-model operations on an adapted model: merging adapters into the base (and back), and optimizer parameter
groups (LoRA+, layer-wise learning-rate decay)."""
