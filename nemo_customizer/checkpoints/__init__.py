"""Checkpoint files: where a model's weights come from, TP-aware HF weight mappings, safetensors reading and
writing, the embedded GGUF model.

Knows files and tensors, never the model: ``models/`` imports this package, not the reverse.
"""
