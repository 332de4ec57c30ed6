"""Image-text checkpoints (Gemma 3 4B and larger, ``Gemma3ForConditionalGeneration``) trained as text models: where
the text model's tensors sit in each file layout, and the vision tower's, which we carry over unchanged.

Inside the package the text model's weights and LoRA modules go by their text-only names (``model.layers.N...``,
``lm_head.weight``, as in ``Gemma3ForCausalLM``); the names are translated here, at the files:

- transformers 4's files, which transformers 5 still writes by default (``save_original_format``):
  ``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``;
- transformers 5's module names (``save_pretrained(..., save_original_format=False)``): ``model.language_model.*``,
  ``lm_head.weight``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``.

A PEFT adapter names the modules of the model ``transformers`` builds (4.52 and later):
``base_model.model.model.language_model.layers.N.self_attn.q_proj``. SigLIP's attention has its own ``q_proj``,
``k_proj`` and ``v_proj``, so the adapter's ``target_modules`` is a regular expression that only the language
model's modules match (:func:`language_model_targets`); a list of names would make PEFT wrap the vision tower's too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from nemo_customizer.checkpoints.hf_loader import SafetensorsCheckpoint

TEXT_DECODER = "model."
"""The text model's decoder prefix in its text-only names (``model.layers.N...``, ``model.embed_tokens.weight``)."""
TEXT_LM_HEAD = "lm_head.weight"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module name in an adapter's tensor names."""
_SHOWN = 3


@dataclass(frozen=True)
class TextLayout:
    """Where one file layout keeps the text model's decoder and untied output head, and the vision tower."""

    decoder: str
    """Prefix standing for the text-only names' ``model.``."""
    lm_head: str
    vision: Tuple[str, ...]
    """Prefixes of the tensors the text model does not use (vision tower, multi-modal projector)."""

    def to_text(self, name: str) -> str:
        """A tensor name of this layout → the text model's name."""
        return TEXT_LM_HEAD if name == self.lm_head else TEXT_DECODER + name.removeprefix(self.decoder)

    def from_text(self, name: str) -> str:
        """The text model's tensor name → this layout's."""
        return self.lm_head if name == TEXT_LM_HEAD else self.decoder + name.removeprefix(TEXT_DECODER)

    def is_text(self, name: str) -> bool:
        return name.startswith(self.decoder) or name == self.lm_head

    def is_vision(self, name: str) -> bool:
        return name.startswith(self.vision)


LAYOUTS: Tuple[TextLayout, ...] = (
    TextLayout("language_model.model.", "language_model.lm_head.weight", ("vision_tower.", "multi_modal_projector.")),
    TextLayout("model.language_model.", "lm_head.weight", ("model.vision_tower.", "model.multi_modal_projector.")),
)


def layout_of(names: Iterable[str], source: str | Path) -> TextLayout:
    """The layout of an image-text checkpoint's tensor names. ValueError when none of them is a text-model weight
    (a vision-only file, or not an image-text checkpoint), or when some are neither text nor vision weights."""
    names = list(names)
    for layout in LAYOUTS:
        if any(name.startswith(layout.decoder) for name in names):
            unknown = [name for name in names if not (layout.is_text(name) or layout.is_vision(name))]
            if unknown:
                raise ValueError(f"{source}: tensors {unknown[:_SHOWN]} are neither the text model's "
                                 f"({layout.decoder}*) nor the vision tower's ({', '.join(layout.vision)}*); is this "
                                 "a Gemma3ForConditionalGeneration checkpoint?")
            return layout
    shown = ", ".join(sorted(names)[:_SHOWN]) or "none"
    raise ValueError(f"{source}: no text-model weights in this image-text checkpoint: expected tensors under "
                     f"{' or '.join(layout.decoder for layout in LAYOUTS)}, found {shown}; the text model is what "
                     "trains, so its weights must be in the checkpoint.")


class TextModelWeights:
    """An image-text checkpoint's text-model tensors under their text-only names, read like a
    :class:`SafetensorsCheckpoint`; the vision tower's tensors are never read."""

    def __init__(self, checkpoint: SafetensorsCheckpoint):
        self.directory = checkpoint.directory
        self.layout = layout_of(checkpoint.names(), checkpoint.directory)
        self._checkpoint = checkpoint

    def shape(self, name: str) -> torch.Size:
        return self._checkpoint.shape(self.layout.from_text(name))

    def read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        return self._checkpoint.read(self.layout.from_text(name), dim, start, stop)

    def names(self) -> List[str]:
        return [self.layout.to_text(name) for name in self._checkpoint.names() if self.layout.is_text(name)]


def with_vision_weights(text_state: Dict[str, torch.Tensor], source_dir: str | Path) -> Dict[str, torch.Tensor]:
    """The text model's weights (text-only names) renamed into the source checkpoint's layout, plus the source's
    vision tower and projector tensors, unchanged (their dtype too): a checkpoint ``transformers`` loads as the
    image-text model it was."""
    source = SafetensorsCheckpoint(source_dir)
    layout = layout_of(source.names(), source_dir)
    state = {layout.from_text(name): tensor for name, tensor in text_state.items()}
    for name in source.names():
        if layout.is_vision(name):
            state[name] = source.read(name, None, 0, 0)
    return state


# --- PEFT adapters ------------------------------------------------------------------------------------------------

_IMAGE_TEXT_DECODER = LAYOUTS[1].decoder  # the module path transformers (4.52 and later) builds


def image_text_adapter_key(key: str) -> str:
    """A LoRA tensor name under the text model's module names → the image-text model's."""
    return PEFT_PREFIX + _IMAGE_TEXT_DECODER + key.removeprefix(PEFT_PREFIX + TEXT_DECODER)


def text_adapter_key(key: str) -> str:
    """A LoRA tensor name of an image-text model's adapter (transformers 4.52+ or 4.50's module names) → the text
    model's; any other name unchanged."""
    for layout in LAYOUTS:
        if key.startswith(PEFT_PREFIX + layout.decoder):
            return PEFT_PREFIX + TEXT_DECODER + key.removeprefix(PEFT_PREFIX + layout.decoder)
    return key


def language_model_targets(projections: Sequence[str]) -> str:
    """``target_modules`` of an image-text model's adapter: a regular expression (PEFT matches the whole module
    name) that the language model's ``projections`` match and the vision tower's same-named ones do not."""
    return (re.escape(_IMAGE_TEXT_DECODER) + r"layers\.\d+\.(?:self_attn|mlp)\.(" + "|".join(sorted(projections))
            + ")")


def projections_of_targets(pattern: str) -> Optional[List[str]]:
    """The projections of a ``target_modules`` expression :func:`language_model_targets` wrote; None for any
    other expression."""
    match = re.search(r"\(([\w|]+)\)$", pattern)
    names = match.group(1).split("|") if match else []
    return names if names and language_model_targets(names) == pattern else None
