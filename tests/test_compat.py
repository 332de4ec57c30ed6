"""nemo_customizer.compat: each adaptation of megatron-core / torch does its job, the scoped ones are undone on exit,
and the check names a symbol the installed megatron-core no longer has."""

import importlib
import queue
import subprocess
import sys

import pytest
import torch
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.tensor_parallel import random as mcore_random

from nemo_customizer import compat
from nemo_customizer.compat import megatron_cpu

TORCH_CURRENT_DEVICE, TORCH_SYNCHRONIZE = torch.cuda.current_device, torch.cuda.synchronize


@pytest.fixture
def no_cpu_job():
    """No CPU job holds the adaptations (a test module's parallel state would); the originals are in place."""
    assert not compat.cpu_adaptations_active()
    assert torch.cuda.current_device is TORCH_CURRENT_DEVICE and torch.cuda.synchronize is TORCH_SYNCHRONIZE


@pytest.fixture
def cpu_job():
    """A one-process CPU parallel state for one test, torn down after it."""
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel

    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    yield layout
    destroy_parallel(layout)


# --- megatron_cpu: scoped CPU adaptations -------------------------------------------------------------------------


def test_mcore_modules_create_cuda_tensors_on_the_cpu_and_get_torch_back(no_cpu_job):
    modules = [importlib.import_module(name) for name in megatron_cpu.MODULES_WITH_CUDA_TENSORS]
    originals = [module.torch for module in modules]
    with compat.cpu_adaptations():
        for module in modules:
            assert isinstance(module.torch, compat.CudaToCpuTorch)
            assert module.torch.zeros(2, device="cuda").device.type == "cpu"
            assert module.torch.full((1,), 3, device=torch.device("cuda", 0)).device.type == "cpu"
            assert module.torch.float32 is torch.float32  # everything else is the real torch
    assert [module.torch for module in modules] == originals and all(m is torch for m in originals)


def test_current_device_is_the_cpu_and_torch_s_own_afterwards(no_cpu_job):
    with compat.cpu_adaptations():
        assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.current_device is TORCH_CURRENT_DEVICE


def test_synchronize_does_nothing_and_is_torch_s_own_afterwards(no_cpu_job):
    with compat.cpu_adaptations():
        assert torch.cuda.synchronize() is None and torch.cuda.synchronize("cuda:0") is None
    assert torch.cuda.synchronize is TORCH_SYNCHRONIZE


def test_mcore_rng_state_functions_use_the_cpu_generator(no_cpu_job):
    get, set_ = mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state
    with compat.cpu_adaptations():
        torch.manual_seed(11)
        state = mcore_random._get_cuda_rng_state(clone=True)
        assert torch.equal(state, torch.get_rng_state())
        first = torch.rand(3)
        mcore_random._set_cuda_rng_state(state)
        assert torch.equal(torch.rand(3), first)
    assert (mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state) == (get, set_)


def test_rng_tracker_forks_cpu_generator_states_and_the_original_tracker_returns(no_cpu_job):
    tracker, initialized = mcore_random._CUDA_RNG_STATE_TRACKER, mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED
    with compat.cpu_adaptations():
        ours = mcore_random.get_cuda_rng_tracker()
        assert isinstance(ours, megatron_cpu.CpuRNGStatesTracker) and mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED
        ours.add("dropout", 5)
        torch.manual_seed(0)
        outside = torch.get_rng_state()
        with ours.fork("dropout"):
            forked = torch.rand(4)
        assert torch.equal(forked, torch.rand(4, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(torch.get_rng_state(), outside)  # the fork left the default state as it was
        with ours.fork("dropout"):  # the named state moved on
            assert not torch.equal(torch.rand(4), forked)
    assert mcore_random._CUDA_RNG_STATE_TRACKER is tracker
    assert mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED == initialized


def test_gradient_clipping_accepts_cpu_gradients(no_cpu_job):
    clip = mcore_optimizer.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones(3)
    with pytest.raises(AssertionError):  # mcore's own asserts 'torch.cuda.FloatTensor'
        clip(params, 1.0, 4.0)
    with compat.cpu_adaptations():
        mcore_optimizer.clip_grad_by_total_norm_fp32(params, 1.0, 4.0)
        mcore_optimizer.clip_grad_by_total_norm_fp32(params, 10.0, 4.0)  # a factor above 1: no change
    for p in params:
        torch.testing.assert_close(p.grad, torch.full((3,), 1.0 / (4.0 + 1e-6)))
    assert mcore_optimizer.clip_grad_by_total_norm_fp32 is clip


def test_tied_embedding_setup_keeps_the_weight_on_the_cpu(no_cpu_job):
    """mcore's setup moves the tied embedding with ``.cuda()`` (PP > 1: ``test_pipeline_parallel`` runs it); the
    replacement runs it with ``Tensor.cuda`` as the identity, for that call only."""
    setup = LanguageModule.setup_embeddings_and_output_layer
    cuda = torch.Tensor.cuda
    wrapped = megatron_cpu.tied_embedding_setup_on_cpu(lambda module, weight: weight.cuda())
    weight = torch.zeros(2)
    assert wrapped(None, weight) is weight
    assert torch.Tensor.cuda is cuda
    with compat.cpu_adaptations():
        assert LanguageModule.setup_embeddings_and_output_layer.__wrapped__ is setup
    assert LanguageModule.setup_embeddings_and_output_layer is setup


def test_adaptations_are_counted_and_the_last_exit_restores(no_cpu_job):
    outer = compat.enter_cpu_adaptations()
    inner = compat.enter_cpu_adaptations()
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    inner.exit()
    inner.exit()  # a second exit of the same hold does nothing
    assert compat.cpu_adaptations_active() and torch.cuda.current_device() == "cpu"
    assert mcore_random._CUDA_RNG_STATE_TRACKER is tracker  # the outer job keeps its tracker
    outer.exit()
    assert not compat.cpu_adaptations_active() and torch.cuda.current_device is TORCH_CURRENT_DEVICE


def test_destroying_a_cpu_job_s_parallel_state_gives_torch_its_cuda_functions_back(no_cpu_job):
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    cpu = torch.device("cpu")
    outer = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=cpu, seed=0)
    inner = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=cpu, seed=1)
    destroy_parallel(inner)  # a job inside another (customize() under a test module's parallel state)
    assert torch.cuda.current_device() == "cpu"
    destroy_parallel(outer)
    assert torch.cuda.current_device is TORCH_CURRENT_DEVICE and torch.cuda.synchronize is TORCH_SYNCHRONIZE
    assert mcore_random._CUDA_RNG_STATE_TRACKER is tracker
    initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=cpu, seed=0)
    destroy_parallel()  # no layout: every hold ends
    assert not compat.cpu_adaptations_active() and torch.cuda.current_device is TORCH_CURRENT_DEVICE


def test_a_failed_initialization_releases_its_hold(no_cpu_job):
    from nemo_customizer.distributed.parallel import initialize_parallel

    with pytest.raises(ValueError, match="not divisible"):
        initialize_parallel(tensor_parallel_size=3, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    torch.distributed.destroy_process_group()
    assert not compat.cpu_adaptations_active() and torch.cuda.current_device is TORCH_CURRENT_DEVICE


# --- megatron_optimizer --------------------------------------------------------------------------------------------


def _tiny_job(clip_grad: float = 0.05):
    """A tiny model wrapped in mcore DDP and its optimizer (mcore's default Adam), with gradients of one batch."""
    from _tiny import tiny_arch
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.models.gpt import build_gpt_model, transformer_config
    from nemo_customizer.training.optim import build_optimizer
    from nemo_customizer.training.wrap import wrap_for_training

    torch.manual_seed(0)
    arch = tiny_arch()
    config = transformer_config(arch)
    ddp = wrap_for_training(build_gpt_model(arch, config, torch.device("cpu")), config)
    optimizer = build_optimizer([ddp], HyperparametersConfig(learning_rate=1e-2, clip_grad=clip_grad), torch.float32,
                                fused=False)
    tokens = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(tokens, torch.arange(12).expand(2, -1), None).float().square().mean().backward()
    return ddp, optimizer


def _parts(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def test_the_step_s_parts_update_as_mcore_s_step(cpu_job):
    """``prepare_grads``, the clipping and ``step_with_ready_grads`` together are mcore's ``step()``."""
    reference, reference_optimizer = _tiny_job()
    applied, norm, _ = reference_optimizer.step()
    assert applied and norm > 0.05  # the clip was active
    ddp, optimizer = _tiny_job()
    assert not compat.prepare_grads(optimizer)
    norm = optimizer.get_grad_norm()
    for part in _parts(optimizer):
        compat.clip_grads_by_total_norm(part, norm)
    assert compat.step_with_ready_grads(optimizer)
    for ours, theirs in zip(ddp.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_clipping_scales_the_gradients_by_clip_over_norm(cpu_job):
    _, optimizer = _tiny_job(clip_grad=0.5)
    for part in _parts(optimizer):
        params = part.get_parameters()
        for p in params:
            p.grad = torch.ones_like(p)
        compat.clip_grads_by_total_norm(part, 2.0)
        for p in params:
            torch.testing.assert_close(p.grad, torch.full_like(p, 0.5 / (2.0 + 1e-6)))


def test_a_replaced_inner_optimizer_is_the_one_that_steps_and_gets_the_learning_rate(cpu_job):
    from nemo_customizer.config import HyperparametersConfig
    from nemo_customizer.training.optim import build_scheduler

    _, optimizer = _tiny_job(clip_grad=0.0)
    replacements = []
    for part in _parts(optimizer):
        replacement = torch.optim.SGD(part.optimizer.param_groups, lr=1.0)
        compat.replace_inner_optimizer(part, replacement)
        replacements.append(replacement)
    params = [p for part in _parts(optimizer) for p in part.get_parameters()]
    before = [p.detach().clone() for p in params]
    scheduler = build_scheduler(optimizer, HyperparametersConfig(learning_rate=1e-2, warmup_steps=2), 10)
    scheduler.step(increment=1)  # half-way through the warmup
    assert all(group["lr"] == pytest.approx(5e-3) for r in replacements for group in r.param_groups)
    assert not compat.prepare_grads(optimizer)  # the gradients into .grad
    assert compat.step_with_ready_grads(optimizer)
    for p, b in zip(params, before):  # SGD: w - lr * grad
        torch.testing.assert_close(p.detach(), b - 5e-3 * p.grad)


def test_skipping_the_copy_of_masters_leaves_the_model_weights_to_the_update():
    """On mcore's mixed-precision optimizer (built without its constructor, which wants CUDA tensors)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    def part():
        p = object.__new__(Float16OptimizerWithFloat16Params)
        p.float16_groups = [[torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]]
        p.fp32_from_float16_groups = [[torch.nn.Parameter(torch.full((4,), 0.5))]]
        p._dummy_overflow_buf = None
        return p

    copied, skipped = part(), part()
    copied._copy_main_params_to_model_params()
    assert torch.equal(copied.float16_groups[0][0], torch.full((4,), 0.5, dtype=torch.bfloat16))
    compat.skip_copy_of_masters_to_model(skipped)
    skipped._copy_main_params_to_model_params()
    assert torch.equal(skipped.float16_groups[0][0], torch.zeros(4, dtype=torch.bfloat16))


# --- megatron_checkpointing ----------------------------------------------------------------------------------------


def test_checkpoint_writer_gets_an_in_process_results_queue(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    compat.use_in_process_checkpoint_results_queue()
    results = filesystem_async._get_write_results_queue()  # what mcore's writer asks for: no Manager started
    assert isinstance(results, queue.Queue) and results is filesystem_async._results_queue
    compat.use_in_process_checkpoint_results_queue()
    assert filesystem_async._results_queue is results  # kept


# --- megatron_model ------------------------------------------------------------------------------------------------


def test_gpt_model_hooks_see_mcore_s_decoder_input_and_replace_its_output(cpu_job):
    from _tiny import tiny_arch
    from nemo_customizer.models.gpt import transformer_config
    from nemo_customizer.models.spec import llama_block_spec

    class Recording(compat.GPTModelHooks):
        def prepare_decoder_input(self, decoder_input, rotary_pos_emb, packed_seq_params):
            self.seen = (tuple(decoder_input.shape), tuple(rotary_pos_emb.shape))
            return decoder_input * 0, rotary_pos_emb  # every token's input the same

        def loss_head(self, hidden_states, labels, loss_mask):
            return None if labels is None else hidden_states

    arch = tiny_arch()
    config = transformer_config(arch)
    model = Recording(config=config, transformer_layer_spec=llama_block_spec(config, "auto"),
                      vocab_size=arch.vocab_size, max_sequence_length=64, position_embedding_type="rope")
    tokens = torch.randint(0, arch.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).expand(2, -1)
    logits = model(tokens, positions, None)  # no labels: mcore's output layer
    assert model.seen == ((6, 2, arch.hidden_size), (6, 1, 1, arch.hidden_size // arch.num_attention_heads))
    assert logits.shape == (2, 6, arch.vocab_size)
    torch.testing.assert_close(logits[0, 0], logits[1, 0])  # the zeroed input reached the decoder
    hidden = model(tokens, positions, None, labels=tokens)
    assert hidden.shape == (6, 2, arch.hidden_size)  # (s, b, h): what the decoder handed to loss_head


def test_fused_weight_gradient_accumulation_adds_into_main_grad(cpu_job):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.tensor_parallel import layers as mcore_layers
    from nemo_customizer.models.gpt import transformer_config
    from nemo_customizer.training.wrap import _WeightGradAccumulation
    from _tiny import tiny_arch

    config = transformer_config(tiny_arch())
    linear = ColumnParallelLinear(8, 4, config=config, init_method=torch.nn.init.normal_, bias=False,
                                  gather_output=True)
    assert not linear.gradient_accumulation_fusion
    linear.weight.main_grad = torch.ones_like(linear.weight)
    compat.fuse_weight_grad_accumulation(linear, _WeightGradAccumulation)
    assert linear.gradient_accumulation_fusion
    if not mcore_layers._grad_accum_fusion_available:  # no apex: ours is mcore's GEMM now
        assert mcore_layers.fused_weight_gradient_mlp_cuda is _WeightGradAccumulation
    x = torch.randn(5, 1, 8, generator=torch.Generator().manual_seed(0))
    out, _ = linear(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    expected = 1 + grad_out.reshape(5, 4).t() @ x.reshape(5, 8)
    torch.testing.assert_close(linear.weight.main_grad, expected)


# --- torch_private -------------------------------------------------------------------------------------------------


def test_fused_optimizer_device_types_include_the_cpu_and_cuda():
    types = compat.fused_optimizer_device_types()
    assert "cpu" in types and "cuda" in types
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)  # accepted on a listed device


def test_adam_gradient_scaling_divides_and_found_inf_skips():
    def adam_with_grad(grad):
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = grad.clone()
        return param, torch.optim.AdamW([param], lr=0.1, fused=True)

    grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    scaled, scaled_adam = adam_with_grad(grad * 8)
    plain, plain_adam = adam_with_grad(grad)
    with compat.adam_gradient_scaling([(scaled_adam, torch.tensor(8.0))], torch.tensor(0.0)):
        scaled_adam.step()
    plain_adam.step()
    torch.testing.assert_close(scaled.detach(), plain.detach())
    assert not hasattr(scaled_adam, "grad_scale") and not hasattr(scaled_adam, "found_inf")
    before, step = scaled.detach().clone(), float(scaled_adam.state[scaled]["step"])
    with compat.adam_gradient_scaling([(scaled_adam, torch.tensor(1.0))], torch.tensor(1.0)):
        scaled_adam.step()
    assert torch.equal(scaled.detach(), before) and float(scaled_adam.state[scaled]["step"]) == step


def test_synchronize_callers_are_counted_by_line_and_torch_s_function_returns():
    real = torch.cuda.synchronize
    with compat.count_cuda_synchronize_callers() as callers:
        for _ in range(2):
            try:
                torch.cuda.synchronize()
            except (AssertionError, RuntimeError):  # a CPU-only torch has nothing to synchronize
                pass
    assert list(callers.values()) == [2] and next(iter(callers)).startswith("test_compat.py:")
    assert torch.cuda.synchronize is real


# --- the check -----------------------------------------------------------------------------------------------------


def test_the_installed_versions_have_every_symbol():
    from nemo_customizer.compat._check import REQUIREMENTS, missing_symbols

    assert missing_symbols(REQUIREMENTS) == []


def test_a_missing_symbol_is_named_with_its_patch_and_the_supported_versions(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from nemo_customizer.compat._check import REQUIREMENTS

    monkeypatch.delattr(filesystem_async, "_results_queue")
    monkeypatch.setattr(mcore_optimizer, "clip_grad_by_total_norm_fp32", lambda parameters, max_norm: None)
    with pytest.raises(compat.MegatronCompatError) as error:
        compat.check_compat(REQUIREMENTS)
    message = str(error.value)
    assert isinstance(error.value, ImportError)
    assert ("megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue (needed by "
            "nemo_customizer.compat.megatron_checkpointing::use_in_process_checkpoint_results_queue)") in message
    assert ("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32: parameters total_norm, "
            "use_decoupled_grad") in message
    assert "megatron-core 0.16.x" in message and "installed: megatron-core 0.16" in message


def test_importing_compat_imports_neither_torch_nor_megatron():
    code = ("import sys, nemo_customizer.compat; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
