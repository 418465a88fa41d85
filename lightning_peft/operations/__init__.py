"""Whole-model operations on an adapted model: merging adapters into the base (and back), and optimizer parameter
groups (LoRA+, layer-wise learning-rate decay), layer pruning, the spectrum of a learned weight perturbation, and scoring
a language model on text (loss sums, generation diversity)."""
