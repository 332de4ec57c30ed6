"""The loss head: output projection + fp32 cross-entropy of the loss positions, never all ``[tokens, vocab]`` logits.

In training, ``OutputCrossEntropy`` computes every gradient in the forward pass, chunk by chunk of
``LOSS_CHUNK_TOKENS`` positions, while the chunk's logits exist, and keeps only the ``(n, h)`` gradient of the hidden
states and, when the output weight trains (full fine-tuning), its ``(vocab, h)`` gradient summed over the chunks. No
logits are kept and none are recomputed in backward: against checkpointed chunks, one ``(n, h) x (h, vocab)`` GEMM
fewer per step (a noticeable part of a small model's step at a large vocabulary), and the cross-entropy is one
pass that writes its gradient (``models.loss_kernel`` on CUDA). Under tensor parallelism each rank holds a vocabulary
shard: the softmax's max, normalizer and target logit are all-reduced over the TP group,
each rank's partial gradient of the hidden states is summed by the all-reduce that
``copy_to_tensor_model_parallel_region`` does in backward, and each rank's weight gradient is its shard's own.
Without gradients (validation) the losses come from a cross-entropy over each chunk's logits in turn; asked for
``token_hits``, the same chunks also say whether each position's argmax prediction is its target (the validation's
``mean_token_accuracy``), under tensor parallelism with the row maximum and its index all-reduced over the shards.

With a ``softcap`` (Gemma 2's ``final_logit_softcapping``) every path caps the logits, ``tanh(logit / cap) * cap`` in
fp32, before the cross-entropy, and the gradients computed in forward carry the cap's derivative: the caps happen
inside the chunk's cross-entropy (and inside the Triton kernel), so no capped ``[tokens, vocab]`` copy is kept.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

from nemo_customizer.models import softcap as softcapping
from nemo_customizer.models.fused import fused_on_cuda, triton_kernel

# Tokens per chunk of the output projection + cross-entropy: a chunk's logits are the largest temporary
# (bf16 [1024, 128k] = 256 MiB at a 128k vocabulary).
LOSS_CHUNK_TOKENS = 1024


def _cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor,
                        softcap: Optional[float] = None) -> torch.Tensor:
    logits = logits.float()
    if softcap is not None:
        logits = softcapping.softcap(logits, softcap)
    return F.cross_entropy(logits, targets, reduction="none")


# fp32 cross-entropy over bf16 logits, fused: the [tokens, vocab] fp32 logits (0.5 GB per 1k tokens at a 128k
# vocabulary) and their softmax are never written to memory, forward or backward. One vocabulary shard only (TP=1);
# sharded vocabularies use mcore's vocab-parallel cross-entropy.
_fused_cross_entropy = fused_on_cuda(_cross_entropy_fp32)


def _cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap: Optional[float] = None):
    """fp32 cross-entropy per row and its gradient w.r.t. the logits (softmax minus one-hot, times the softcap's
    slope), in the logits' dtype (as autograd of ``_cross_entropy_fp32`` gives it)."""
    dtype, logits = logits.dtype, logits.float()
    if softcap is not None:
        logits = softcapping.softcap(logits, softcap)
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    losses = (log_normalizer - logits.gather(1, targets.unsqueeze(1))).squeeze(1)
    is_target = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == targets.unsqueeze(1)
    grad = torch.exp(logits - log_normalizer) - is_target.float()
    if softcap is not None:
        grad = grad * softcapping.softcap_slope(logits, softcap)
    return losses, grad.to(dtype)


_fused_cross_entropy_and_grad = fused_on_cuda(_cross_entropy_and_grad)


def _kernel_cross_entropy_and_grad():
    """The hand-written Triton kernel of ``_cross_entropy_and_grad`` (``models.loss_kernel``), or None without Triton."""
    return triton_kernel("nemo_customizer.models.loss_kernel", "cross_entropy_and_grad_triton")


def _vocab_parallel_cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                                           softcap: Optional[float] = None):
    """``_cross_entropy_and_grad`` of logits whose vocabulary is split over the tensor-parallel group: this rank's
    ``(n, vocab/tp)`` shard (rank r holds ids ``[r·vocab/tp, (r+1)·vocab/tp)``, as mcore's vocab-parallel output
    layer does). Returns the full losses (n,) and this shard's columns of the logits' gradient."""
    group = parallel_state.get_tensor_model_parallel_group()
    # One fp32 (n, vocab/tp) buffer, updated in place: logits, shifted logits, exponentials, then the gradient
    # (with a softcap, a second one holds the cap's slope).
    dtype, buffer = logits.dtype, logits.float()
    slope = None
    if softcap is not None:
        buffer = softcapping.softcap(buffer, softcap)
        slope = softcapping.softcap_slope(buffer, softcap)
    shard = buffer.shape[1]
    local_targets = targets - parallel_state.get_tensor_model_parallel_rank() * shard
    in_shard = (local_targets >= 0) & (local_targets < shard)
    local_targets = local_targets.clamp(0, shard - 1).unsqueeze(1)
    row_max = buffer.max(dim=1).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    buffer.sub_(row_max.unsqueeze(1))
    target_logit = buffer.gather(1, local_targets).squeeze(1) * in_shard
    buffer.exp_()
    sums = torch.stack([buffer.sum(dim=1), target_logit])  # one all-reduce for the normalizer and the target logit
    dist.all_reduce(sums, group=group)
    normalizer, target_logit = sums
    buffer.div_(normalizer.unsqueeze(1)).scatter_add_(1, local_targets, -in_shard.to(buffer.dtype).unsqueeze(1))
    if slope is not None:
        buffer.mul_(slope)
    return normalizer.log() - target_logit, buffer.to(dtype)


class OutputCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy (n,) of ``hidden @ weight.T`` against ``targets``, times ``position_weights`` (n,)
    when given (e.g. 0 on a CUDA graph's padding positions), the logits softcapped where ``softcap`` is given; all
    gradients computed in forward (module docstring).

    The hidden states' gradient is exact for any upstream gradient: position i's loss depends on hidden row i only,
    so its gradient is the forward's row i scaled by the upstream gradient of loss i. The output weight's gradient
    (when it trains) is a sum over all positions, which backward can only scale: it needs the same upstream gradient
    at every position, as a sum of the losses gives (the training step sums them; weight positions with
    ``position_weights``, not by scaling the losses afterwards). A different one fails an assertion on the device.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                position_weights: Optional[torch.Tensor], softcap: Optional[float] = None) -> torch.Tensor:
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None  # (vocab/tp, h) in the weight's dtype, summed over chunks by the GEMMs' accumulation
        sharded = parallel_state.get_tensor_model_parallel_world_size() > 1
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            rows = slice(start, start + LOSS_CHUNK_TOKENS)
            logits = F.linear(hidden[rows], weight)  # (chunk, vocab/tp), the activation dtype
            if sharded:
                cross_entropy = _vocab_parallel_cross_entropy_and_grad
            else:
                cross_entropy = _kernel_cross_entropy_and_grad() if logits.is_cuda else None
                cross_entropy = cross_entropy or _fused_cross_entropy_and_grad
            chunk_losses, grad_logits = cross_entropy(logits, targets[rows], softcap=softcap)
            del logits
            # Position weights scale the (chunk, h) operands and results, not the (chunk, vocab) gradient.
            scale = None if position_weights is None else position_weights[rows].unsqueeze(1).to(hidden.dtype)
            losses[rows] = chunk_losses if scale is None else chunk_losses * position_weights[rows]
            grad_hidden[rows] = grad_logits @ weight
            if scale is not None:
                grad_hidden[rows] *= scale
            if ctx.needs_input_grad[1]:
                chunk_hidden = hidden[rows] if scale is None else hidden[rows] * scale
                if grad_weight is None:
                    grad_weight = grad_logits.t() @ chunk_hidden
                else:
                    grad_weight.addmm_(grad_logits.t(), chunk_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_losses.unsqueeze(1).to(grad_hidden.dtype)
        if grad_weight is not None:
            # No host read of the check: it would stall the step (and a CUDA graph could not capture it).
            torch._assert_async(torch.all(grad_losses == grad_losses[0]),
                                "the loss head's output weight gradient needs the same upstream gradient at every "
                                "position (sum the losses; weight positions with position_weights)")
            grad_weight = grad_weight * grad_losses[0].to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _token_losses(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                  softcap: Optional[float] = None, token_hits: bool = False
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Without gradients: the losses (n,) fp32 and, with ``token_hits``, the argmax hits (n,) bool
    (``argmax_hits``; else None), chunk by chunk of ``LOSS_CHUNK_TOKENS`` positions: one chunk's logits at a time."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hits = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device) if token_hits else None
    for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        logits = F.linear(hidden[rows], weight)  # (chunk, vocab/tp)
        if hits is not None:  # before the cross-entropy, which may shift the logits in place
            hits[rows] = argmax_hits(logits, targets[rows])
        losses[rows] = _cross_entropy_of_logits(logits, targets[rows], softcap)
    return losses, hits


def argmax_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) bool: whether each row's argmax over the whole vocabulary is its target, with ``torch.argmax``'s rule
    for ties (the first of equal maxima). ``logits`` (n, vocab/tp) is this rank's vocabulary shard under tensor
    parallelism (rank r holds ids ``[r·vocab/tp, (r+1)·vocab/tp)``): the row maximum, then the smallest id holding
    it, are all-reduced over the group (two ``(n,)`` all-reduces). A softcap is monotonic, so the uncapped logits
    have the capped ones' argmax: none is applied here."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits.argmax(dim=-1) == targets
    group = parallel_state.get_tensor_model_parallel_group()
    shard = logits.shape[1]
    local_max, local_index = logits.max(dim=-1)  # the first maximum of the shard
    local_max = local_max.float()
    row_max = local_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    vocab = shard * parallel_state.get_tensor_model_parallel_world_size()  # larger than any id: "not in this shard"
    first = torch.where(local_max == row_max,
                        local_index + parallel_state.get_tensor_model_parallel_rank() * shard,
                        torch.full_like(local_index, vocab))
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    return first == targets


def _logit_losses(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                  softcap: Optional[float] = None) -> torch.Tensor:
    return _cross_entropy_of_logits(F.linear(hidden, weight), targets, softcap)  # logits (n, vocab/tp)


def _cross_entropy_of_logits(logits: torch.Tensor, targets: torch.Tensor,
                             softcap: Optional[float] = None) -> torch.Tensor:
    if logits.is_cuda and parallel_state.get_tensor_model_parallel_world_size() == 1:
        return _fused_cross_entropy(logits, targets, softcap=softcap)
    logits = logits.float()
    if softcap is not None:
        logits = softcapping.softcap(logits, softcap)
    return vocab_parallel_cross_entropy(logits.unsqueeze(1), targets.unsqueeze(1)).squeeze(1)


def _recomputed_token_losses(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                             softcap: Optional[float] = None) -> torch.Tensor:
    """``_logit_losses`` chunk by chunk, each chunk's logits recomputed in backward (activation checkpointing):
    exact gradients for any upstream gradient, at the cost of one more ``(n, h) x (h, vocab)`` GEMM and
    cross-entropy in backward than ``OutputCrossEntropy``. No chunk's logits outlive its forward or backward."""
    hidden = copy_to_tensor_model_parallel_region(hidden)
    # No RNG state to keep: the projection and cross-entropy draw no random numbers.
    return torch.cat([checkpoint(_logit_losses, hidden[start:start + LOSS_CHUNK_TOKENS],
                                 targets[start:start + LOSS_CHUNK_TOKENS], weight, softcap, use_reentrant=False,
                                 preserve_rng_state=False)
                      for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS)])


def masked_token_losses(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                        position_weights: Optional[torch.Tensor] = None, *,
                        softcap: Optional[float] = None, per_position_grads: bool = False,
                        token_hits: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Cross-entropy (n,) of hidden states (n, h) against targets (n,) with a vocab-parallel output weight, times
    ``position_weights`` (n,) when given; ``softcap``: the logits are ``tanh(logit / cap) * cap`` (module docstring).
    With gradients, sum the result before backward when the weight trains (``OutputCrossEntropy``), unless
    ``per_position_grads``: then any upstream gradient is exact (``_recomputed_token_losses``; a preference loss
    weighs each response's tokens by how its pair compares).
    ``token_hits`` (without gradients only: validation): returns ``(losses, hits)``, ``hits`` (n,) bool saying
    whether each position's argmax prediction is its target (``argmax_hits``)."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        losses, hits = _token_losses(hidden, targets, weight, softcap, token_hits)
        losses = losses if position_weights is None else losses * position_weights
        return (losses, hits) if token_hits else losses
    if token_hits:
        raise ValueError("token_hits are counted in forward passes without gradients (validation): run the model "
                         "under torch.no_grad()")
    if per_position_grads and weight.requires_grad:
        losses = _recomputed_token_losses(hidden, targets, weight, softcap)
        return losses if position_weights is None else losses * position_weights
    # identity forward; backward all-reduces the TP ranks' partial gradients (a no-op at TP=1)
    return OutputCrossEntropy.apply(copy_to_tensor_model_parallel_region(hidden), weight, targets, position_weights,
                                    softcap)
