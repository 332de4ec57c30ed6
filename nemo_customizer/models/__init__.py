"""The model: layer spec, core attention, kernels, GPTModel build, and one declarative file per HF family.

Depends on ``checkpoints/`` (weight mappings, safetensors reading) to load and gather HF weights; ``checkpoints/``
never imports this package.
"""
