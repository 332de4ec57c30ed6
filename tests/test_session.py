"""``TrainingSession``: what it builds for a job, what it builds for inference, and what it tears down."""

import pytest
import torch

STEPS = 10


def _config(model_dir, *overrides):
    """The tiny checkpoint's resolved config (its architecture from config.json), on CPU in fp32."""
    import dataclasses

    from nemo_customizer.checkpoints.resolve import resolve_model
    from nemo_customizer.config import compose_config

    cfg = compose_config(["model=tiny-llama-test", "model.random_weights=false", f"model.checkpoint={model_dir}",
                          "device=cpu", "precision=fp32", *overrides])
    return dataclasses.replace(cfg, model=resolve_model(cfg.model, cfg.cache_dir).config)


def _parallel_state_is_up() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized() and torch.distributed.is_initialized()


def test_a_training_session_builds_what_the_job_trains(model_dir):
    from nemo_customizer.training.session import TrainingSession

    cfg = _config(model_dir, "hyperparameters.lora.adapter_dim=4",
                  "hyperparameters.lora.target_modules=[q_proj,v_proj]", "hyperparameters.learning_rate=1e-3",
                  "hyperparameters.warmup_steps=2")
    with TrainingSession(cfg, checkpoint_dir=model_dir) as session:
        assert _parallel_state_is_up() and session.layout.world_size == 1
        model = session.build_model()
        wrapped = session.build_training(STEPS)
        # LoRA on q and v of each layer: r × (in + out) parameters per adapter, nothing else trains.
        arch = cfg.model.architecture
        hidden, q_out, kv_out = arch.hidden_size, arch.num_attention_heads * 16, arch.num_key_value_heads * 16
        expected = arch.num_hidden_layers * 4 * ((hidden + q_out) + (hidden + kv_out))
        trained = [p for p in model.parameters() if p.requires_grad]
        assert session.trainable.trainable_parameters == sum(p.numel() for p in trained) == expected
        assert session.trainable.total_parameters == sum(p.numel() for p in model.parameters())
        # The job trains the DDP wrapper of this model, and the optimizer steps exactly its trained parameters.
        assert wrapped is session.wrapped and wrapped.module is model
        stepped = [p for group in session.optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in stepped} == {id(p) for p in trained} and len(stepped) == len(trained)
        # The schedule is the job's: linear warmup from 0 over 2 of the 10 steps, then the peak rate.
        assert session.scheduler.lr_warmup_steps == 2 and session.scheduler.lr_decay_steps == STEPS
        assert all(group["lr"] == 0.0 for group in session.optimizer.param_groups)
        session.scheduler.step(increment=2)
        assert session.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
        assert session.graphs is None  # cuda_graphs is off
    assert not _parallel_state_is_up()  # it started the parallel state, so it destroyed it
    assert session.model is None and session.optimizer is None and session.trainable.trainable_parameters == expected


def test_full_fine_tuning_trains_every_weight(model_dir):
    from nemo_customizer.training.session import TrainingSession

    with TrainingSession(_config(model_dir, "hyperparameters.finetuning_type=all_weights"),
                         checkpoint_dir=model_dir) as session:
        model = session.build_model()
        session.build_training(STEPS)
        assert all(p.requires_grad for p in model.parameters())
        assert session.trainable.trainable_parameters == session.trainable.total_parameters > 0
        assert sum(p.numel() for g in session.optimizer.param_groups for p in g["params"]) == \
            session.trainable.total_parameters


def test_packed_training_with_graphs_runs_the_wrapped_model_through_them(model_dir):
    """On a CPU the graph runner runs uncaptured; it trains the session's DDP wrapper."""
    from nemo_customizer.training.session import TrainingSession

    cfg = _config(model_dir, "hyperparameters.cuda_graphs=true", "hyperparameters.sequence_packing_enabled=true")
    with TrainingSession(cfg, checkpoint_dir=model_dir) as session:
        session.build_model()
        session.build_training(STEPS, packed=True, pad_id=0)
        assert session.graphs is not None and not session.graphs.capture
        assert session.graphs.model is session.wrapped
        assert session.graphs.max_seqlen == cfg.model.max_seq_length
    with TrainingSession(cfg, checkpoint_dir=model_dir) as session:
        session.build_model()
        session.build_training(STEPS, packed=False)
        assert session.graphs is None  # graphs replay packed micro batches only


def test_an_inference_session_builds_the_base_model_and_no_optimizer(model_dir):
    from safetensors.torch import load_file

    from nemo_customizer.training.session import TrainingSession

    with TrainingSession(_config(model_dir), checkpoint_dir=model_dir) as session:
        model = session.build_model(trainable=False)
        assert session.trainable is None and session.wrapped is None and session.optimizer is None
        assert session.scheduler is None and session.graphs is None
        assert not any(".adapters." in name for name, _ in model.named_parameters())  # no LoRA attached
        # The checkpoint's weights were loaded (not the random initialization).
        hf = load_file(str(model_dir / "model.safetensors"))
        torch.testing.assert_close(model.embedding.word_embeddings.weight.detach(), hf["model.embed_tokens.weight"])
        with pytest.raises(RuntimeError, match="build_model"):
            session.build_training(STEPS)
    assert not _parallel_state_is_up()


def test_a_session_leaves_a_given_parallel_state_alone(model_dir):
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.training.session import TrainingSession

    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cpu"),
                                 seed=0)
    try:
        with TrainingSession(_config(model_dir), checkpoint_dir=model_dir, layout=layout) as session:
            assert session.layout is layout and not session.owns_layout
            session.build_model()
            session.build_training(STEPS)
        assert _parallel_state_is_up()  # the caller's, still there
        assert session.model is None and session.wrapped is None  # the session's own parts are let go
    finally:
        destroy_parallel(layout)
    assert not _parallel_state_is_up()


def test_a_failed_build_still_tears_the_parallel_state_down(model_dir, tmp_path):
    from nemo_customizer.training.session import TrainingSession

    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        with TrainingSession(_config(model_dir), checkpoint_dir=tmp_path) as session:  # no weights there
            session.build_model()
    assert not _parallel_state_is_up()
