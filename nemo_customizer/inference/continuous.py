"""Continuous batching: rows decode together, new rows join and finished rows leave between steps.

``Generator.complete_batch`` runs a fixed set of rows through it; the OpenAI server (``serving.scheduler``) feeds it
requests as they arrive, so a new request starts decoding at the next step instead of waiting for a batch to drain.
With adapters attached (``Generator.attach_adapters``) every forward first tells the model which adapter each row
uses, so rows of different adapters share one decode step and one copy of the base weights.

A longrope model (Phi-3.5: ``models.longrope``) rotates a sequence longer than its original context with other RoPE
factors, which changes every layer's keys and values of the tokens before too: a row that grows past that length is
prefilled again, alone and whole, once, so that its logits stay those of its whole sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple

from nemo_customizer.inference._kv_cache import LiveKVCache, prefill
from nemo_customizer.models.longrope import prefill_again_at

if TYPE_CHECKING:
    from nemo_customizer.inference.generator import Generator, Row


class ContinuousBatch:
    """Up to ``max_rows`` rows of one generator, decoded one token per row per ``step``.

    ``add`` prefills a row alone (exactly as a single prompt is) and chooses its first token; from the next ``step``
    on the row decodes with the others. Call from one thread (the one that owns the model), under
    ``torch.inference_mode()``.
    """

    def __init__(self, generator: "Generator", max_rows: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.generator = generator
        self.max_rows = max_rows
        self.rows: List["Row"] = []  # decoding now; rows[i] is row i of the cache
        self._joining: List[Tuple["Row", object]] = []  # prefilled (row, one-row cache), in the cache from next step
        self._cache = LiveKVCache(generator.device)
        self._prefill_again_at = prefill_again_at(generator.model)  # a longrope row's length that switches its RoPE

    @property
    def free_slots(self) -> int:
        """Rows that can be added now."""
        return self.max_rows - len(self.rows) - len(self._joining)

    @property
    def active(self) -> bool:
        """Whether a ``step`` has work: a row is still generating."""
        return any(not row.done for row in self.rows) or any(not row.done for row, _ in self._joining)

    def add(self, row: "Row") -> None:
        """Prefill ``row``'s prompt and choose its first token (which may already finish it)."""
        if self.free_slots < 1:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        self._select([row])
        logits, context = prefill(self.generator.model, row.prompt_ids, self.generator.device)  # (vocab,)
        # sample on the CPU in fp32: the per-row torch.Generator is a CPU generator, bf16 logits lose ties
        row.push(logits.float().cpu())
        if not row.done:
            self._joining.append((row, context))

    def step(self) -> None:
        """Feed every live row its last token and choose the next; finished and cancelled rows leave first."""
        self._prefill_rows_switching_rope()
        if self._joining or any(row.done for row in self.rows):
            self._rebuild()
        if not self.rows:
            return
        self._select(self.rows)
        logits = self._cache.decode(self.generator.model, [row.generated[-1] for row in self.rows])  # (b, vocab)
        for row, row_logits in zip(self.rows, logits.float().cpu()):
            row.push(row_logits)

    def _prefill_rows_switching_rope(self) -> None:
        """Rows whose next forward would be the first over more tokens than a longrope model's original context:
        prefilled again with every token so far (their next token chosen from that), joining as new rows."""
        if self._prefill_again_at is None:
            return
        joining = {id(row): (row, context) for row, context in self._joining}
        for row in self.rows + [row for row, _ in self._joining]:
            if row.done or len(row.prompt_ids) + len(row.generated) != self._prefill_again_at:
                continue
            self._select([row])
            logits, context = prefill(self.generator.model, row.prompt_ids + row.generated, self.generator.device)
            row.push(logits.float().cpu())
            joining[id(row)] = (row, context)  # replaces a joining row's own prefill
        self._joining = list(joining.values())

    def _rebuild(self) -> None:
        # read each row's `done` once: another thread may cancel a row meanwhile, and the kept indices and the
        # row list must agree
        moving = {id(row) for row, _ in self._joining}  # rows prefilled again leave their old place in the cache
        keep = [(index, row) for index, row in enumerate(self.rows) if not row.done and id(row) not in moving]
        joining = [(row, context) for row, context in self._joining if not row.done]
        rows = [row for _, row in keep] + [row for row, _ in joining]
        # the tokens each row may still feed back: its budget minus what it generated (the last is never fed)
        room = max((row.budget - len(row.generated) for row in rows), default=0)
        self._cache.rebuild([index for index, _ in keep], [context for _, context in joining], room)
        self.rows = rows
        self._joining = []

    def _select(self, rows: Sequence["Row"]) -> None:
        if self.generator.lora is not None:
            self.generator.lora.select([row.adapter for row in rows])
