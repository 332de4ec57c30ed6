"""One optimizer step and one validation pass through Megatron's forward/backward schedule.

The loss is the mean over every loss-masked token of the global batch (all micro batches and data-parallel ranks),
not a mean of per-micro-batch means: mcore sums token losses (``calculate_per_token_loss``) and the optimizer step
divides the summed gradients by the global token count (``_optimizer_step``). That holds unchanged for packed micro
batches (``collate_packed``): the model returns one loss per masked token whichever layout the tokens came in.
Another ``training.objective.Objective`` (the preference loss: ``training.preference``) sums its own loss and count
per micro batch (pairs), and the same division makes the step's loss its mean over the global batch.

With pipeline parallelism the stages exchange activations of one fixed shape ``[s, b, h]`` (``s/tp`` under SP) for
every micro batch of a step, so ``forward_backward`` first right-pads the step's micro batches to its longest one
(``uniform_length``); the padding carries no loss, so the losses equal the unpadded ones.

A step whose loss or gradient norm is NaN/inf raises ``NonFiniteStep`` before the optimizer touches the weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from nemo_customizer.compat import adam_gradient_scaling, clip_grads_by_total_norm, prepare_grads, step_with_ready_grads
from nemo_customizer.distributed.collectives import all_reduce_sum_
from nemo_customizer.models.gpt import upload
from nemo_customizer.training.objective import TOKEN_MEAN, Objective
from nemo_customizer.training.optim import device_grad_norm, fused_adams

MicroBatch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-mean loss over the global batch."""
    loss_tokens: int
    """Loss-masked tokens in the global batch (the objective's count: pairs for the preference loss)."""
    real_tokens: int
    """Non-padding input tokens this step processed, all ranks together (for tokens/s)."""
    grad_norm: float
    learning_rate: float
    skipped: bool
    """mcore skipped the update (fp16 loss scaling found inf/nan gradients and lowered the scale)."""
    report: Tuple[float, ...] = ()
    """The objective's further sums over the global batch (``Objective.metrics`` names them); none for SFT."""


class NonFiniteStep(FloatingPointError):
    """The step's loss or gradient norm is NaN or infinite; the optimizer update was not applied.

    Every rank raises it at the same step: the loss is summed over the data-parallel and pipeline ranks, and the
    gradient norm is taken after the data-parallel reduction and summed over the model-parallel ranks.
    """


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """THD params for one packed row (self-attention: the same boundaries for queries and keys)."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def _to_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    """Move a collated batch to ``device``; a packed one (``collate_packed``) gets its ``PackedSeqParams``.

    ``loss_mask`` stays on the host: the model finds the loss positions from it without a device sync
    (``models.gpt.loss_positions``).
    """
    # Read the host-side int before the copy: mcore sizes RoPE tables with it, and a device scalar would sync.
    max_seqlen = int(batch["max_seqlen"]) if "max_seqlen" in batch else None
    moved = {k: (upload(v, device) if isinstance(v, torch.Tensor) and k != "loss_mask" else v)
             for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    if max_seqlen is not None:
        moved["packed_seq_params"] = packed_seq_params(upload(batch["cu_seqlens"], device), max_seqlen)
    return moved


def uniform_length(micro_batches: List[MicroBatch]) -> List[MicroBatch]:
    """Right-pad every micro batch to the step's longest ``s`` (padded batches) or ``t`` (packed THD rows).

    The padding is behind every real position (causal attention never looks at it) and has ``loss_mask`` 0, so the
    loss and gradients are unchanged; padded ids are 0, any in-vocabulary id would do. A packed row gets the padding
    as one more segment of its own in ``cu_seqlens``, as ``collate_packed`` pads for sequence parallelism.
    """
    length = max(b["tokens"].shape[1] for b in micro_batches)
    return [_pad_to(b, length) for b in micro_batches]


def _pad_to(batch: MicroBatch, length: int) -> MicroBatch:
    extra = length - batch["tokens"].shape[1]
    if extra == 0:
        return batch
    padded = dict(batch)
    for key in ("tokens", "labels", "loss_mask"):
        padded[key] = F.pad(batch[key], (0, extra))  # [b, s] -> [b, length]
    if "sequence_index" in batch:  # pairs (collate_pairs): the padding belongs to no sequence
        padded["sequence_index"] = F.pad(batch["sequence_index"], (0, extra), value=-1)
    if "cu_seqlens" in batch:  # packed [1, t]: positions restart for the padding segment
        positions = torch.arange(extra, dtype=batch["position_ids"].dtype)
        padded["cu_seqlens"] = torch.cat([batch["cu_seqlens"], batch["cu_seqlens"].new_tensor([length])])
        padded["max_seqlen"] = torch.clamp(batch["max_seqlen"], min=extra)
    else:
        positions = torch.arange(batch["tokens"].shape[1], length, dtype=batch["position_ids"].dtype)
    padded["position_ids"] = torch.cat([batch["position_ids"], positions.expand(batch["tokens"].shape[0], -1)], 1)
    return padded


def forward_backward(model, micro_batches: List[MicroBatch], device: torch.device, forward_only: bool,
                     objective: Objective = TOKEN_MEAN) -> torch.Tensor:
    """mcore's schedule over this rank's micro batches (padded or packed); returns the global report of
    ``objective`` (``[loss sum, loss tokens]`` for the default; float64, on ``device``, summed over data-parallel
    and pipeline ranks; ``.tolist()`` reads it).

    With ``forward_only=False`` the gradients end in the DDP buffers (``param.main_grad``), finalized (DP/SP
    reductions) but not yet divided by the global count (``report[1]``): ``_optimizer_step`` does that.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        micro_batches = uniform_length(micro_batches)
    micro_batches = [objective.prepare(b) for b in micro_batches]
    seq_length = max(b["tokens"].shape[1] for b in micro_batches)
    outputs = get_forward_backward_func()(
        forward_step_func=objective.forward_step,
        data_iterator=iter([_to_device(b, device) for b in micro_batches]),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    totals = torch.zeros(objective.report_size, dtype=torch.float64, device=device)
    for out in outputs:  # only the last pipeline stage has outputs; summed on the device, read once per step
        totals += out["report"]
    return _global_totals(totals)


def graphed_forward_backward(graphs, micro_batches: List[MicroBatch]) -> torch.Tensor:
    """``forward_backward`` (training, one pipeline stage) with each micro batch's forward+backward replayed from a
    CUDA graph (``training.graphs``); the schedule around them is mcore's: gradient accumulation under ``no_sync``,
    then the gradient finalization (the division by the loss-token count is ``_optimizer_step``'s)."""
    config = get_model_config(graphs.model)
    loss = torch.zeros((), dtype=torch.float64, device=graphs.device)
    tokens = 0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with (contextlib.nullcontext() if last or config.no_sync_func is None else config.no_sync_func()):
            micro_loss, micro_tokens = graphs.micro_batch(batch)
        loss += micro_loss
        tokens += micro_tokens
    if config.finalize_model_grads_func is not None:  # no token count: _optimizer_step divides by it
        config.finalize_model_grads_func([graphs.model], None)
    return _global_totals(torch.stack([loss, torch.full_like(loss, tokens)]))


def _global_totals(totals: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks, and bring the last stage's numbers to every pipeline stage (on the device)."""
    all_reduce_sum_(totals, parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        all_reduce_sum_(totals, parallel_state.get_pipeline_model_parallel_group())
    return totals


def _real_tokens(micro_batches: Iterable[MicroBatch], device: torch.device) -> torch.Tensor:
    """Non-padding input tokens of the step, all data-parallel ranks together (a device scalar: no host sync)."""
    local = sum(int(b["num_real_tokens"]) for b in micro_batches)
    return all_reduce_sum_(torch.full((), local, dtype=torch.float64, device=device),
                           parallel_state.get_data_parallel_group())


def train_step(model, optimizer, scheduler, micro_batches: List[MicroBatch], device: torch.device,
               graphs=None, objective: Objective = TOKEN_MEAN) -> StepResult:
    """Forward/backward over this rank's micro batches, gradient reduction, clipping, optimizer and LR step.

    ``graphs``: a ``training.graphs.GraphedForwardBackward`` of ``model`` to replay packed micro batches with.
    Raises ``NonFiniteStep`` (weights and optimizer state untouched) when the loss or gradient norm is not finite.
    ``queue_step(...).result()``: the host reads the step's numbers once, after the whole step is queued.
    """
    return queue_step(model, optimizer, scheduler, micro_batches, device, graphs, objective).result()


@dataclass
class QueuedStep:
    """A training step whose work is queued on the device; ``result()`` reads its numbers (the step's one host
    sync). The training loop queues the next step before reading this one, so the host's work between steps
    (collating, launching, logging) overlaps the GPU's instead of leaving it idle."""

    numbers: torch.Tensor
    """float64 ``[loss sum, loss tokens, real tokens, gradient norm, the objective's further sums ...]`` in host
    memory, written by the device when ``ready`` has passed."""
    ready: Optional[torch.cuda.Event]
    """Recorded after the copy to ``numbers`` (CUDA); reading waits for this event, not for the whole stream: the
    stream already holds the next step's work, and a plain read would wait for that too."""
    learning_rate: float
    update_ok: bool
    scheduler: object
    schedule_advanced: bool = False

    def advance_schedule(self) -> None:
        """Step the LR schedule now, before the numbers are read, so that the next step can be queued with its
        learning rate. Should this step turn out non-finite, ``result()`` raises and the job ends: that schedule
        step is never used. Without this call, ``result()`` steps the schedule once the step is known finite."""
        if self.update_ok and not self.schedule_advanced:
            self.scheduler.step(increment=1)
        self.schedule_advanced = True

    def result(self) -> StepResult:
        """The step's numbers; raises ``NonFiniteStep`` when its loss or gradient norm is not finite (the update was
        then skipped on the device: weights and optimizer state are as before this step)."""
        if self.ready is not None:
            self.ready.synchronize()
        loss_sum, loss_tokens, real, norm, *report = self.numbers.tolist()
        loss = loss_sum / max(loss_tokens, 1)
        if not math.isfinite(loss):
            raise NonFiniteStep(f"training loss is {loss}")
        if self.update_ok and not math.isfinite(norm):
            raise NonFiniteStep(f"gradient norm is {norm}")
        self.advance_schedule()
        return StepResult(loss=loss, loss_tokens=int(loss_tokens), real_tokens=int(real), grad_norm=norm,
                          learning_rate=self.learning_rate, skipped=not self.update_ok, report=tuple(report))


def queue_step(model, optimizer, scheduler, micro_batches: List[MicroBatch], device: torch.device,
               graphs=None, objective: Objective = TOKEN_MEAN) -> QueuedStep:
    """``train_step`` up to reading its numbers: everything queued on the device; the LR schedule is stepped by
    the returned ``QueuedStep``. Optimizers that need the host to read the gradient norm first (not torch's fused
    Adam) sync inside ``_optimizer_step``.
    ``model.train()`` runs only when ``model`` itself is not in training mode: switch ``model`` to eval, not one of
    its inner modules.
    """
    if not model.training:  # the walk over every module costs host time, while the GPU waits
        model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    if graphs is not None:  # the supervised objective only (config.validate)
        totals = graphed_forward_backward(graphs, micro_batches)
    else:
        totals = forward_backward(model, micro_batches, device, forward_only=False, objective=objective)
    real_tokens = _real_tokens(micro_batches, device)
    learning_rate = optimizer.param_groups[0]["lr"]
    update_ok, grad_norm = _optimizer_step(optimizer, totals, device)
    numbers = torch.cat([totals[:2], real_tokens.reshape(1), grad_norm.double().reshape(1), totals[2:]])
    ready = None
    if numbers.is_cuda:
        numbers = numbers.to("cpu", non_blocking=True)  # into pinned memory, ordered before the next step's work
        ready = torch.cuda.Event()
        ready.record()
    return QueuedStep(numbers, ready, learning_rate, update_ok, scheduler)


def _optimizer_step(optimizer, totals: torch.Tensor, device: torch.device) -> Tuple[bool, torch.Tensor]:
    """mcore's ``optimizer.step()`` in its three parts, plus the division of the summed gradients by the global
    loss-token count (``totals[1]``), guarded against non-finite values; returns (applied, the gradient norm of the
    per-token mean loss, on the device).

    mcore checks gradients for inf/nan only under fp16 loss scaling (``prepare_grads``' found_inf: it skips the
    update). With bf16/fp32 it would clip by a NaN norm and write NaN into every trained weight. The norm is computed
    once, as ``step()`` does, and also when ``clip_grad`` is 0 (``step()`` then skips it): the loop logs it.

    With torch's fused Adam (``optim.fused_adams``) the whole step stays on the device: the token count and the clip
    factor become the kernel's ``grad_scale`` (it divides the gradients by it) and a non-finite loss or norm its
    ``found_inf``, which makes it skip the update (moments and step count included); ``train_step`` then raises
    ``NonFiniteStep``. Otherwise the host reads the loss and the norm first and returns before any update when one
    is not finite, then divides and clips as mcore does.
    """
    if prepare_grads(optimizer):  # fp16 loss scaling found inf/nan: skip this update, as mcore's step() does
        return False, torch.full((), math.nan, device=device)
    tokens = totals[1].float().clamp(min=1.0)
    grad_norm = device_grad_norm(optimizer, device) / tokens
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    adams = fused_adams(optimizer)
    if adams is None:
        loss, norm, count = torch.stack([totals[0].double(), grad_norm.double(), tokens.double()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return True, grad_norm  # train_step raises; nothing was updated
        for part in parts:
            grads = [p.grad for p in part.get_parameters() if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, count)
            if part.config.clip_grad > 0.0 and grads:  # ChainedOptimizer.step clips each part
                clip_grads_by_total_norm(part, norm)
        return step_with_ready_grads(optimizer), grad_norm
    found_inf = (~(torch.isfinite(grad_norm) & torch.isfinite(totals[0]))).float()
    # mcore scales the mean gradients by clip / (norm + 1e-6) when that is below 1.
    scales = [(adam, tokens * torch.clamp((grad_norm + 1e-6) / part.config.clip_grad, min=1.0)
               if part.config.clip_grad > 0.0 else tokens) for part, adam in adams]
    with adam_gradient_scaling(scales, found_inf):
        return step_with_ready_grads(optimizer), grad_norm


@torch.no_grad()
def validation_totals(model, batches: Iterable[List[MicroBatch]], device: torch.device,
                      objective: Objective = TOKEN_MEAN) -> List[float]:
    """The objective's report summed over the whole validation set (``[loss sum, count, ...]``); the training loop
    passes its objective's ``validation`` (for SFT ``[loss sum, loss tokens, tokens predicted right]``)."""
    model.eval()
    totals = torch.zeros(objective.report_size, dtype=torch.float64, device=device)
    for micro_batches in batches:
        totals += forward_backward(model, micro_batches, device, forward_only=True, objective=objective)
    model.train()
    return totals.tolist()


def validation_loss(model, batches: Iterable[List[MicroBatch]], device: torch.device) -> float:
    """Token-mean loss over the whole validation set."""
    loss_sum, tokens = validation_totals(model, batches, device)
    return loss_sum / tokens if tokens else float("nan")
