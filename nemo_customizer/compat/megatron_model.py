"""Hooks into megatron-core 0.16.x's model code that its public API does not offer."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.utils import WrappedTensor


class GPTModelHooks(GPTModel):
    """megatron-core's ``GPTModel`` with two public hooks around its forward.

    megatron-core 0.16.x's ``GPTModel.forward`` calls the private ``_preprocess`` (embedding and RoPE table; returns
    a tuple whose first two items are the decoder input and the RoPE table) and returns the private
    ``_postprocess`` (output layer and loss). They are overridden here and only here; a subclass implements
    ``prepare_decoder_input`` and ``loss_head`` instead. Without them the model could neither skip mcore's RoPE for
    packed rows nor compute the loss on loss-masked positions only.
    """

    def prepare_decoder_input(self, decoder_input: Optional[torch.Tensor], rotary_pos_emb, packed_seq_params
                              ) -> Tuple[Optional[torch.Tensor], object]:
        """Return the decoder input and RoPE table to use (default: mcore's, unchanged); ``decoder_input`` is None
        on a pipeline stage without the embedding."""
        return decoder_input, rotary_pos_emb

    def loss_head(self, hidden_states: torch.Tensor, labels: Optional[torch.Tensor],
                  loss_mask) -> Optional[torch.Tensor]:
        """The forward's output computed from the decoder's ``hidden_states``, or None for mcore's own output layer
        (logits, or its loss)."""
        return None

    def _preprocess(self, *args, packed_seq_params=None, **kwargs):
        out = super()._preprocess(*args, packed_seq_params=packed_seq_params, **kwargs)
        # In inference mode mcore hands the embedding over as a WrappedTensor (so the decoder can free it); the
        # hook always sees a tensor, and the decoder gets it wrapped again.
        wrapped = isinstance(out[0], WrappedTensor)
        decoder_input, rotary_pos_emb = self.prepare_decoder_input(out[0].unwrap() if wrapped else out[0], out[1],
                                                                   packed_seq_params)
        return (WrappedTensor(decoder_input) if wrapped else decoder_input, rotary_pos_emb, *out[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        output = self.loss_head(hidden_states, labels, loss_mask)
        if output is None:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask,
                                        **kwargs)
        return output


def fuse_weight_grad_accumulation(linear: torch.nn.Module, gemm) -> None:
    """Switch on gradient-accumulation fusion in one built ``ColumnParallelLinear``/``RowParallelLinear``: its
    backward adds the weight gradient into ``weight.main_grad`` inside the GEMM.

    megatron-core 0.16.x (``tensor_parallel/layers.py``) reads the layer's ``gradient_accumulation_fusion`` at each
    forward and takes the GEMM from apex's ``fused_weight_gradient_mlp_cuda`` module; without apex the private
    ``_grad_accum_fusion_available`` is False, the config flag is refused at construction and that module does not
    exist. ``gemm`` (an object with the module's ``wgrad_gemm_accum_fp32``/``wgrad_gemm_accum_fp16``) is installed
    in its place, for the whole process. Call after DDP has given the weight its ``main_grad``.
    """
    if not mcore_layers._grad_accum_fusion_available:
        mcore_layers.fused_weight_gradient_mlp_cuda = gemm
    linear.gradient_accumulation_fusion = True
