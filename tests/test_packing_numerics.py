"""Packed training numerics: the loss and the LoRA gradients of packed micro batches equal those of the same examples
in padded micro batches (fp32, GQA), through the real schedule (mcore forward/backward, DDP, finalize_model_grads),
at TP=1 in-process and at TP=2 / TP=2+SP / DP=2 over gloo; the CUDA-graph path (run without capture) too."""

import random

import pytest
import torch

from _multiproc import run_world
from _tiny import tiny_arch, write_tiny_checkpoint

RTOL = 1e-5
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]  # every projection, in any family


def _examples(vocab: int, n: int = 10, seed: int = 0):
    from nemo_customizer.data import TokenizedExample

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(3, 30)
        prompt = rng.randint(1, length - 1)
        examples.append(TokenizedExample([rng.randrange(vocab) for _ in range(length)],
                                         [0] * prompt + [1] * (length - prompt)))
    return examples


def _session_config(checkpoint_dir: str, tp: int, sp: bool, arch=None):
    """LoRA on every linear layer of the tiny checkpoint (``arch``: its architecture, a tiny GQA Llama unless given),
    packed training micro batches through the CUDA-graph runner (uncaptured on a CPU) of 48-token bins."""
    from nemo_customizer.config import Config, HyperparametersConfig, LoraConfig, ModelConfig

    return Config(
        model=ModelConfig(checkpoint=checkpoint_dir, architecture=arch or tiny_arch(heads=4, kv_heads=2),
                          max_seq_length=48,
                          tensor_parallel_size=tp, use_sequence_parallel=sp),
        hyperparameters=HyperparametersConfig(seed=0, sequence_packing_enabled=True, cuda_graphs=True, lora=LoraConfig(
            adapter_dim=4, adapter_dropout=0.0, target_modules=TARGETS)),
        device="cpu", precision="fp32")


def packed_and_unpacked(checkpoint_dir: str, tp: int, sp: bool, layout=None, arch=None) -> dict:
    """Loss and LoRA grads (this rank's shards) for padded, packed and attention-leaking packed micro batches."""
    from nemo_customizer.data import collate, collate_packed, pack_examples
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import forward_backward, graphed_forward_backward

    with TrainingSession(_session_config(checkpoint_dir, tp, sp, arch), checkpoint_dir=checkpoint_dir,
                         layout=layout) as session:
        cpu = torch.device("cpu")
        model = session.build_model()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA B starts at zero (zero grads for A); random adapters exercise every gradient path
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.1, generator=gen)
        # The CUDA-graph path without capture: static shapes (padded rows, empty segments, padded loss positions) and
        # its own loop around mcore's gradient finalization.
        ddp = session.build_training(total_steps=1, packed=True)
        graphs = session.graphs
        assert graphs is not None and not graphs.capture and graphs.model is ddp
        arch = session.cfg.model.architecture
        pad_multiple = tp if sp else 1
        examples = _examples(arch.vocab_size)
        bins = pack_examples(examples, 48)
        assert 1 < len(bins) < len(examples)  # something was packed together, into more than one bin
        unpacked = [collate(examples[:4], pad_id=0, pad_to_multiple_of=pad_multiple),
                    collate(examples[4:], pad_id=0, pad_to_multiple_of=pad_multiple)]
        packed = [collate_packed(bins[:1], pad_id=0, pad_to_multiple_of=pad_multiple),
                  collate_packed(bins[1:], pad_id=0, pad_to_multiple_of=pad_multiple)]
        # Control: the same packed rows with one segment per row, so attention crosses example boundaries.
        leaking = [dict(b, cu_seqlens=torch.tensor([0, b["tokens"].shape[1]], dtype=torch.int32),
                        max_seqlen=torch.tensor(b["tokens"].shape[1])) for b in packed]

        out = {}  # the graphed runs twice: first runs, then the buffers' copy-in path
        for name, batches in (("unpacked", unpacked), ("packed", packed), ("leaking", leaking), ("graphed", packed),
                              ("graphed_again", packed)):
            ddp.zero_grad_buffer()
            if name.startswith("graphed"):
                loss_sum, tokens = graphed_forward_backward(graphs, batches).tolist()
            else:
                loss_sum, tokens = forward_backward(ddp, batches, cpu, forward_only=False).tolist()
            out[name] = {"loss": loss_sum / tokens, "tokens": tokens,
                         "grads": {n: p.main_grad.detach().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}}
        return out


def check_packed_equals_unpacked(out: dict, grad_rtol: float = RTOL) -> None:
    """``grad_rtol``: the LoRA gradients' relative tolerance (a family whose norms amplify fp32 rounding more than
    Llama's may pass a larger one)."""
    ref, leaking = out["unpacked"], out["leaking"]
    for packed in (out["packed"], out["graphed"], out["graphed_again"]):
        assert packed["tokens"] == ref["tokens"] > 0
        assert packed["loss"] == pytest.approx(ref["loss"], rel=RTOL)
        assert ref["grads"].keys() == packed["grads"].keys() and len(ref["grads"]) > 0
        for name, expected in ref["grads"].items():
            assert expected.norm() > 0, name
            error = (packed["grads"][name] - expected).norm() / expected.norm()
            assert error <= grad_rtol, f"{name}: relative error {error:.2e}"
    # The comparison can fail: letting attention cross examples changes the loss and the gradients well beyond RTOL.
    assert abs(leaking["loss"] - ref["loss"]) > 10 * RTOL * abs(ref["loss"])
    assert max((leaking["grads"][n] - g).norm() / g.norm() for n, g in ref["grads"].items()) > 1e-2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("packing_numerics")
    write_tiny_checkpoint(directory, tiny_arch(heads=4, kv_heads=2))
    return directory


def test_packed_loss_and_lora_grads_equal_unpacked_tp1(cpu_parallel, checkpoint):
    check_packed_equals_unpacked(packed_and_unpacked(str(checkpoint), tp=1, sp=False, layout=cpu_parallel))


def _worker(rank: int, checkpoint_dir: str, tp: int, sp: bool, out_prefix: str) -> None:
    torch.save(packed_and_unpacked(checkpoint_dir, tp, sp), f"{out_prefix}.rank{rank}.pt")  # its own parallel state


@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (1, False)], ids=["tp2", "tp2sp", "dp2"])
def test_packed_loss_and_lora_grads_equal_unpacked_two_processes(checkpoint, tmp_path, tp, sp):
    run_world(_worker, 2, str(checkpoint), tp, sp, str(tmp_path / "out"))
    for rank in range(2):
        check_packed_equals_unpacked(torch.load(tmp_path / f"out.rank{rank}.pt"))
