"""Preference pairs for the DPO job tests, from the tiny classification data (``_tiny.write_classification_data``):
each prompt/completion row becomes a pair whose chosen response is its label and whose rejected one is the other
label. The job reads and tokenizes the rows as usual; ``tokenize_examples`` then returns the pairs."""

from __future__ import annotations

import dataclasses

OTHER_LABEL = {"yes": "no", "no": "yes"}


def tokenize_as_pairs() -> None:
    """Make ``nemo_customizer.data.tokenize_examples`` (which ``customize`` calls) return pairs, in this process."""
    from nemo_customizer import data
    from nemo_customizer.data import TokenizedPair

    real = getattr(data.tokenize_examples, "real", data.tokenize_examples)

    def tokenize_examples(examples, tokenizer, max_seq_length):
        chosen, stats = real(examples, tokenizer, max_seq_length)
        flipped = [dataclasses.replace(e, completion=OTHER_LABEL[e.completion]) for e in examples]
        rejected, _ = real(flipped, tokenizer, max_seq_length)
        assert len(chosen) == len(rejected) == len(examples)  # short rows: nothing is dropped
        return [TokenizedPair(c, r) for c, r in zip(chosen, rejected)], stats

    tokenize_examples.real = real
    data.tokenize_examples = tokenize_examples


def restore_tokenization() -> None:
    from nemo_customizer import data

    data.tokenize_examples = getattr(data.tokenize_examples, "real", data.tokenize_examples)
