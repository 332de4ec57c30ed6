"""Attribute replacements that remember what they replaced, so they can be undone."""

from __future__ import annotations

from typing import Any, List, Tuple

_ABSENT = object()


class AttributePatches:
    """``replace`` sets an attribute of a module or class; ``undo`` puts every original back, newest first.

    The original is read from the owner's own ``__dict__``: an attribute the owner inherited (``torch.Tensor.cuda``
    comes from ``torch._C.TensorBase``) is deleted again on undo, so inheritance takes over as before.
    """

    def __init__(self) -> None:
        self._originals: List[Tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Any) -> None:
        self._originals.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._originals:
            owner, name, original = self._originals.pop()
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
