"""``DatasetReport``: what an upload found (files, formats, rows, token lengths, fit at ``max_seq_length``; for
preference data also the lengths of each pair's prompt and responses).

Pure data and formatting; ``store.upload`` fills it in. It round-trips through ``dataset.json`` so ``datasets show``
prints the same report without loading a tokenizer again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from nemo_customizer.data.examples import TokenizedPair
from nemo_customizer.data.tokenization import tokenize_examples
from nemo_customizer.data.truncation import TruncationStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NUM_BUCKETS = 8
BAR_WIDTH = 40
SHOWN_DROPPED = 5
"""Dropped rows named in ``__str__``; the rest are counted."""
STORED_DROPPED = 20
"""Dropped rows' ``path:line`` kept in ``dataset.json``."""
_UNBOUNDED = 1 << 40
"""A ``max_seq_length`` no row reaches: tokenizing with it gives every row's full length."""


@dataclass(frozen=True)
class FileSummary:
    """One source file of the dataset."""

    path: str
    split: str
    """``"training"`` or ``"validation"``."""
    format: str
    rows: int


@dataclass(frozen=True)
class LengthHistogram:
    """Token lengths (special tokens included, before truncation) in up to ``NUM_BUCKETS`` equal-width buckets."""

    buckets: tuple[tuple[int, int, int], ...]
    """``(low, high, count)`` with inclusive bounds, ascending."""
    count: int
    min: int
    median: int
    p95: int
    max: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], num_buckets: int = NUM_BUCKETS) -> "LengthHistogram":
        if not lengths:
            return cls(buckets=(), count=0, min=0, median=0, p95=0, max=0)
        ordered = sorted(lengths)
        low, high = ordered[0], ordered[-1]
        width = math.ceil((high - low + 1) / num_buckets)
        counts = [0] * math.ceil((high - low + 1) / width)
        for length in ordered:
            counts[(length - low) // width] += 1
        buckets = tuple((low + i * width, min(low + (i + 1) * width - 1, high), c) for i, c in enumerate(counts))
        return cls(buckets=buckets, count=len(ordered), min=low, median=_quantile(ordered, 0.5),
                   p95=_quantile(ordered, 0.95), max=high)

    def lines(self, max_seq_length: int) -> list[str]:
        """One line per bucket: range, bar, count; buckets with rows over ``max_seq_length`` are marked."""
        if not self.buckets:
            return []
        peak = max(count for _, _, count in self.buckets)
        digits, count_digits = len(str(self.max)), len(str(peak))
        out = []
        for low, high, count in self.buckets:
            bar = "#" * (math.ceil(count * BAR_WIDTH / peak) if count else 0)
            mark = "" if high <= max_seq_length else "  (partly over max_seq_length)" if low <= max_seq_length \
                else "  (over max_seq_length)"
            out.append(f"  {low:>{digits}} - {high:>{digits}}  {bar:<{BAR_WIDTH}}  {count:>{count_digits}}{mark}")
        return out

    def summary(self) -> str:
        return f"min {self.min}, median {self.median}, p95 {self.p95}, max {self.max}"


@dataclass(frozen=True)
class PairLengths:
    """Token lengths of the parts of preference pairs (before truncation): the prompt and each response."""

    prompt: LengthHistogram
    """Tokens before the responses (for chat, the rendered conversation through the assistant header)."""
    chosen: LengthHistogram
    rejected: LengthHistogram
    """Each response's tokens (its EOS or end-of-turn token included)."""

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[int, int, int]]) -> "PairLengths":
        """From ``(prompt, chosen, rejected)`` token counts, one per pair."""
        prompt, chosen, rejected = zip(*parts) if parts else ((), (), ())
        return cls(prompt=LengthHistogram.from_lengths(prompt), chosen=LengthHistogram.from_lengths(chosen),
                   rejected=LengthHistogram.from_lengths(rejected))

    def lines(self) -> list[str]:
        return [f"  {name:<9} {part.summary()}"
                for name, part in (("prompt", self.prompt), ("chosen", self.chosen), ("rejected", self.rejected))]

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "PairLengths":
        return cls(**{name: _histogram(part) for name, part in record.items()})


@dataclass(frozen=True)
class Measurement:
    """What ``measure`` found for one split."""

    lengths: list[int]
    """Per row, its tokens before truncation; for a preference pair, those of its longer sequence."""
    fit: TruncationStats
    """The rows at ``max_seq_length``: unchanged, truncated, dropped."""
    pair_parts: list[tuple[int, int, int]]
    """Preference data: ``(prompt, chosen, rejected)`` tokens of each pair before truncation (empty for other
    formats)."""


@dataclass(frozen=True)
class DatasetReport:
    """What ``upload`` validated and stored; ``str(report)`` is what ``datasets upload``/``show`` print."""

    name: str
    path: str
    """The stored dataset's directory (pass ``name`` or this to ``customize(dataset=...)``)."""
    source: str
    format: str
    files: tuple[FileSummary, ...]
    ignored_files: tuple[str, ...]
    """``*.jsonl`` files next to the data that are neither training nor validation files (not stored)."""
    training_rows: int
    validation_rows: int
    """Rows in validation files; 0 means training holds out ``dataset.val_fraction`` of the training rows."""
    model: str
    max_seq_length: int
    lengths: LengthHistogram
    """Token lengths of all rows with ``model``'s tokenizer, before truncation."""
    training_fit: TruncationStats
    """Training rows at ``max_seq_length``: unchanged, truncated, dropped."""
    validation_fit: TruncationStats
    content_sha256: str
    created: str
    """UTC time of the upload, ISO 8601."""
    pair_lengths: Optional[PairLengths] = None
    """Preference data: the lengths of the prompts and responses of all pairs."""

    def __str__(self) -> str:
        rows = "pairs" if self.pair_lengths is not None else "rows"
        lines = [f"dataset {self.name!r}: {self.format}, {self.training_rows} training {rows}, "
                 f"{self.validation_rows} validation {rows}", f"  stored at {self.path} (from {self.source})"]
        lines += [f"  {f.split:<10}  {f.format:<17}  {f.rows:>7} rows  {f.path}" for f in self.files]
        lines += [f"  ignored     {path}" for path in self.ignored_files]
        if not self.validation_rows:
            lines.append("  no validation files: training holds out dataset.val_fraction of the training rows")
        counted = "rows" if self.pair_lengths is None else "pairs, the longer sequence of each"
        lines.append(f"token lengths with {self.model}'s tokenizer ({self.lengths.count} {counted}, special tokens "
                     f"included): {self.lengths.summary()}")
        lines += self.lengths.lines(self.max_seq_length)
        if self.pair_lengths is not None:
            lines.append("token lengths of the parts of each pair:")
            lines += self.pair_lengths.lines()
        lines.append(f"at max_seq_length={self.max_seq_length}:")
        for split, fit in (("training", self.training_fit), ("validation", self.validation_fit)):
            if fit.kept or fit.dropped:
                lines.append(f"  {split}: {fit.unchanged} fit, {fit.truncated} truncated, {fit.dropped} dropped")
        origins = self.training_fit.dropped_origins + self.validation_fit.dropped_origins
        for origin in origins[:SHOWN_DROPPED]:
            lines.append(f"    dropped: {origin}")
        hidden = self.training_fit.dropped + self.validation_fit.dropped - min(len(origins), SHOWN_DROPPED)
        if hidden > 0:
            lines.append(f"    ... and {hidden} more dropped")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (dropped-row locations capped at ``STORED_DROPPED`` per split)."""
        record = dataclasses.asdict(self)
        for key in ("training_fit", "validation_fit"):
            record[key]["dropped_origins"] = record[key]["dropped_origins"][:STORED_DROPPED]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "DatasetReport":
        fields = dict(record)
        fields["files"] = tuple(FileSummary(**f) for f in record["files"])
        fields["ignored_files"] = tuple(record["ignored_files"])
        fields["lengths"] = _histogram(record["lengths"])
        if record.get("pair_lengths") is not None:
            fields["pair_lengths"] = PairLengths.from_dict(record["pair_lengths"])
        fields["training_fit"] = TruncationStats(**record["training_fit"])
        fields["validation_fit"] = TruncationStats(**record["validation_fit"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


def measure(examples: Sequence[Any], tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Measurement:
    """Full token lengths of ``examples`` and what the format's truncation rule does to them at ``max_seq_length``.

    Both come from ``tokenize_examples``, so they are exactly what training will see. Only rows longer than
    ``max_seq_length`` are tokenized a second time.
    """
    full, _ = tokenize_examples(examples, tokenizer, _UNBOUNDED)
    lengths = [_length(e) for e in full]
    pair_parts = [_parts(e) for e in full if isinstance(e, TokenizedPair)]
    if len(full) != len(examples):
        # The format dropped rows regardless of length, so lengths no longer line up with rows: apply the limit to all.
        _, stats = tokenize_examples(examples, tokenizer, max_seq_length)
        return Measurement(lengths, stats, pair_parts)
    # A row that fits untruncated is unchanged by any truncation rule; only the long ones need the rule applied.
    long = [example for example, length in zip(examples, lengths) if length > max_seq_length]
    _, stats = tokenize_examples(long, tokenizer, max_seq_length)
    stats.unchanged += len(examples) - len(long)
    return Measurement(lengths, stats, pair_parts)


def _length(example: Any) -> int:
    """Tokens of a row: of its sequence, or of the longer sequence of a pair (what ``max_seq_length`` bounds)."""
    if isinstance(example, TokenizedPair):
        return max(len(example.chosen.input_ids), len(example.rejected.input_ids))
    return len(example.input_ids)


def _parts(pair: TokenizedPair) -> tuple[int, int, int]:
    """``(prompt, chosen, rejected)`` tokens of a pair; the prompt is what precedes the first trained token."""
    prompt = pair.chosen.loss_mask.index(1)
    return prompt, len(pair.chosen.input_ids) - prompt, len(pair.rejected.input_ids) - prompt


def _histogram(record: dict[str, Any]) -> LengthHistogram:
    return LengthHistogram(**dict(record, buckets=tuple(tuple(b) for b in record["buckets"])))


def _quantile(ordered: Sequence[int], q: float) -> int:
    """The nearest-rank ``q`` quantile of ascending ``ordered``."""
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]
