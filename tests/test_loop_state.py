"""The training loop's state: saved whole by a resumable checkpoint (NaN/inf included), and the one source of the
job's result and of status.json's progress and best-checkpoint fields."""

import dataclasses
import json
import math
import signal

import pytest
import torch

from nemo_customizer.training.early_stopping import EarlyStopping
from nemo_customizer.training.state import LoopState


def _state() -> LoopState:
    """Every field away from its default (a cancelled job in epoch 1 of 4-step epochs, best at step 6)."""
    return LoopState(steps=7, steps_per_epoch=4, global_batch_size=8, last_validated_step=6,
                     early_stopping=EarlyStopping(patience=3, min_delta=0.01, enabled=False, best=1.25, best_at=6,
                                                  bad_validations=1),
                     best_train_loss=1.5, final_train_loss=1.375, final_val_loss=1.3125, stopped_early=True,
                     tokens=1234, seconds=2.5, stop_signal=signal.SIGTERM, stop_reason="cancel request")


def _leaves(saved: dict, prefix: str = ""):
    for key, value in saved.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_field_of_the_state_is_set_by_the_example():
    """The round-trip tests below cover every field only if the example sets each one."""
    default, example = dict(_leaves(LoopState().to_checkpoint())), dict(_leaves(_state().to_checkpoint()))
    assert [name for name in default if example[name] == default[name]] == []


def test_checkpoint_form_compares_equal_across_ranks_and_restores_non_finite_values():
    """A checkpoint's common state is compared across ranks: NaN (never equal to itself) is saved as a string."""
    state = dataclasses.replace(_state(), final_train_loss=-math.inf, final_val_loss=math.nan)
    saved = state.to_checkpoint()
    assert saved == dataclasses.replace(_state(), final_train_loss=-math.inf, final_val_loss=math.nan).to_checkpoint()
    assert json.loads(json.dumps(saved, allow_nan=False)) == saved  # plain values only
    restored = LoopState.from_checkpoint(saved)
    assert math.isnan(restored.final_val_loss) and restored.final_train_loss == -math.inf
    assert restored.to_checkpoint() == saved
    assert LoopState.from_checkpoint(LoopState().to_checkpoint()).early_stopping.best == math.inf


def test_a_field_added_to_the_state_is_saved_without_another_edit():
    @dataclasses.dataclass
    class Grown(LoopState):
        warmup_loss: float = 0.0

    restored = Grown.from_checkpoint(Grown(steps=3, warmup_loss=math.nan).to_checkpoint())
    assert restored.steps == 3 and math.isnan(restored.warmup_loss)
    assert Grown.from_checkpoint(LoopState(steps=3).to_checkpoint()).warmup_loss == 0.0  # an older checkpoint
    with pytest.raises(ValueError, match=r"LoopState has no field\(s\) \['warmup_loss'\]"):
        LoopState.from_checkpoint(Grown().to_checkpoint())  # a checkpoint of another version


def test_a_checkpoint_saves_and_restores_the_state_whole(cpu_parallel, tmp_path):
    from _tiny import tiny_arch
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config
    from nemo_customizer.training import optim
    from nemo_customizer.data import collate
    from nemo_customizer.data.examples import TokenizedExample
    from nemo_customizer.training.checkpointing import Checkpointer
    from nemo_customizer.training.step import train_step
    from nemo_customizer.training.wrap import wrap_for_training

    arch = tiny_arch()
    config = transformer_config(arch)
    model = build_gpt_model(arch, config, torch.device("cpu"))
    ddp = wrap_for_training(model, config)
    hp = HyperparametersConfig(learning_rate=1e-2)
    optimizer = optim.build_optimizer([ddp], hp, torch.float32)
    scheduler = optim.build_scheduler(optimizer, hp, 10)
    batch = collate([TokenizedExample(list(range(1, 10)), [0] * 3 + [1] * 6)], pad_id=0)
    train_step(ddp, optimizer, scheduler, [batch], torch.device("cpu"))  # the optimizer has state to save
    checkpointer = Checkpointer(tmp_path, model, optimizer, scheduler, cpu_parallel)
    state = dataclasses.replace(_state(), final_val_loss=math.nan)
    path = checkpointer.save(state)
    assert path.name == "step_00000007"
    restored = checkpointer.load(path)
    assert isinstance(restored, LoopState) and isinstance(restored.early_stopping, EarlyStopping)
    assert restored.to_checkpoint() == state.to_checkpoint()
    assert math.isnan(restored.final_val_loss)
    assert checkpointer.load(path, weights_only=True) is None


def test_result_and_status_fields_are_derived_from_the_state(tmp_path):
    from nemo_customizer.api import CustomizationResult
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.status import JobStatus

    state = LoopState(steps=10, steps_per_epoch=4, early_stopping=EarlyStopping(best=0.5, best_at=6),
                      best_train_loss=0.75, final_train_loss=0.625, final_val_loss=0.5625, tokens=1000, seconds=4.0)
    assert state.result_fields() == dict(
        steps=10, epochs_completed=2, best_epoch=1, best_step=6, best_val_loss=0.5, final_train_loss=0.625,
        final_val_loss=0.5625, stopped_early=False, tokens_per_second=250.0, train_seconds=4.0)
    assert state.status_fields() == dict(steps_completed=10, best_epoch=1, best_step=6, val_loss=0.5,
                                         train_loss=0.75)
    # before any validation: no best, and JSON's null for the unknown losses
    assert LoopState(steps=3, steps_per_epoch=4).status_fields() == dict(
        steps_completed=3, best_epoch=None, best_step=None, val_loss=None, train_loss=None)
    # CustomizationResult takes them as they are
    result = CustomizationResult(job_dir="j", adapter_path="a", model_path="", metrics_path="m",
                                 **state.result_fields(), peak_memory_gib=1.0, trainable_parameters=1,
                                 total_parameters=2)
    assert {k: getattr(result, k) for k in state.result_fields()} == state.result_fields()
    # status.json shows them, with the progress they imply
    status = JobStatus(JobDirectory(tmp_path))
    status.update(state.status_fields())
    status.running(total_steps=20, steps_per_epoch=4, steps_completed=state.steps)
    written = json.loads((tmp_path / "status.json").read_text())
    assert {k: written[k] for k in state.status_fields()} == state.status_fields()
    assert (written["epochs_completed"], written["percentage_done"]) == (2, 50.0)


def test_a_validation_updates_early_stopping_and_the_best_record():
    state = LoopState(steps_per_epoch=4, early_stopping=EarlyStopping(patience=2, min_delta=0.0))
    state.add_step(1, loss=2.0, tokens=10, seconds=0.5)
    state.add_step(2, loss=1.5, tokens=10, seconds=0.5)
    assert state.add_validation(1.25) is True
    state.add_step(3, loss=1.0, tokens=10, seconds=1.0)
    assert state.add_validation(1.5) is False
    assert (state.best_step, state.best_val_loss, state.best_train_loss, state.final_val_loss) == (2, 1.25, 1.5, 1.5)
    assert (state.tokens, state.seconds, state.final_train_loss, state.epoch) == (30, 2.0, 1.0, 0)
    assert state.early_stopping.bad_validations == 1 and not state.early_stopping.should_stop


def test_a_checkpoint_of_the_earlier_flat_layout_resumes():
    """Checkpoints written before ``LoopState`` held one flat record; a job interrupted then resumes with the same
    step, totals, early-stopping standing and best record."""
    flat = dict(steps=12, steps_per_epoch=5, global_batch_size=8, epochs_completed=2, last_validated_step=10,
                best_val_loss=0.5, best_epoch=1, best_step=10, final_train_loss=0.61, final_val_loss=0.52,
                early_stopping_best=0.5, early_stopping_best_at=10, bad_validations=1, tokens=960, seconds=3.5)
    state = LoopState.from_checkpoint(flat)
    assert (state.steps, state.steps_per_epoch, state.global_batch_size, state.last_validated_step) == (12, 5, 8, 10)
    assert (state.epochs_completed, state.best_epoch, state.best_step, state.best_val_loss) == (2, 1, 10, 0.5)
    assert (state.early_stopping.bad_validations, state.tokens, state.seconds) == (1, 960, 3.5)
    assert (state.final_train_loss, state.final_val_loss) == (0.61, 0.52)
    unknown = LoopState.from_checkpoint({**flat, "best_val_loss": None, "early_stopping_best": None,
                                         "early_stopping_best_at": -1, "final_val_loss": None})
    assert unknown.best_step is None and math.isinf(unknown.best_val_loss) and math.isnan(unknown.final_val_loss)
