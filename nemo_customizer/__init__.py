"""nemo_customizer: customize Megatron-core GPT models (LoRA SFT) on your own data, then run inference.

Public surface: ``customize`` (train), ``evaluate`` (task metrics on held-out data, base beside customized),
``configs`` (list model configs), ``generate`` (inference). Heavy modules
(torch, megatron) load on first use, so ``configs()`` and config errors are instant.
"""

import warnings

from nemo_customizer.config import ConfigError, configs

# megatron-core warns at import and per layer about optional CUDA extensions (apex, Transformer Engine) and its own
# API deprecations; none of them is actionable for a user of this library.
for _message in (r".*(Apex|Transformer Engine).*not installed.*", r"full scope is deprecated.*",
                 r".*tp_group is None.*", r"MLP requires ffn_hidden_size.*"):
    warnings.filterwarnings("ignore", message=_message)

__all__ = ["ConfigError", "configs", "customize", "datasets", "evaluate", "generate"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "customize":
        from nemo_customizer.api import customize

        return customize
    if name == "evaluate":
        from nemo_customizer.evaluation.evaluate import evaluate

        return evaluate
    if name == "generate":
        from nemo_customizer.api import generate

        return generate
    if name == "datasets":
        import importlib

        return importlib.import_module("nemo_customizer.datasets")
    raise AttributeError(f"module 'nemo_customizer' has no attribute {name!r}")
