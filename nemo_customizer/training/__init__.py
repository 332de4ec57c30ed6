"""Training: ``TrainingSession`` (the model, wrapper, optimizer, schedule and CUDA graphs of a job), the loop and its
state, one step, optimizers, checkpoints, metrics and status.

``from nemo_customizer.training import TrainingSession`` imports torch and megatron-core on first use only, so the
light modules here (``state``, ``early_stopping``) stay importable without them.
"""


def __getattr__(name):
    if name == "TrainingSession":
        from nemo_customizer.training.session import TrainingSession

        return TrainingSession
    raise AttributeError(f"module 'nemo_customizer.training' has no attribute {name!r}")


__all__ = ["TrainingSession"]
