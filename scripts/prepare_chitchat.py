#!/usr/bin/env python
"""Write real two-person conversations from the Chit-Chat Challenge as chat JSONL (OpenAI ``messages`` rows).

Source: `chitchat_dataset/dataset.json` in the PyPI package `chitchat-dataset==0.9.0` (MIT, BYU PCC lab; install it
with `pip install --no-deps chitchat-dataset`; it has no dependencies and is located, never imported). It holds 7,168
conversations keyed by id; each is a list of turns, a turn being the consecutive utterances of one sender. Turns
alternate between the two senders; 3,150 conversations have a single turn and are skipped.

Each kept conversation becomes one row: the first sender is the user, the second the assistant, a turn's
utterances joined by newlines; the first ``--max-turns`` turns are kept (long chats run to 564 turns) and a trailing
user turn is dropped so every row ends on an assistant message:

    {"messages": [{"role": "user", "content": "Hello\\nHow are you doing today?"},
                  {"role": "assistant", "content": "whats up MD\\nim doing good\\nhow are you doing?"}]}

Conversations are shuffled with a seed and cut into disjoint training / validation files.

Usage: python scripts/prepare_chitchat.py --output-dir data/chitchat [--train 1000 --validation 100 --max-turns 8
--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Sequence

from nemo_customizer._package_data import package_file
from nemo_customizer.data.jsonl import write_jsonl

INSTALL = "pip install --no-deps chitchat-dataset"


def find_dataset_json() -> pathlib.Path:
    """Path of `dataset.json` inside the installed `chitchat_dataset` package (which is not imported)."""
    return package_file("chitchat_dataset", "dataset.json", INSTALL)


def to_row(turns: Sequence[Sequence[dict]], max_turns: int) -> dict | None:
    """One chat row from a conversation's turns, or ``None`` when no user/assistant exchange remains."""
    texts = ["\n".join(u["text"].strip() for u in turn if u["text"].strip()) for turn in turns[:max_turns]]
    texts = texts[: len(texts) // 2 * 2]  # end on the second sender (the assistant)
    if not texts or not all(texts):
        return None
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]}


def read_rows(path: pathlib.Path, max_turns: int) -> list[dict]:
    """A row for every conversation with at least one exchange, in file order."""
    conversations = json.loads(path.read_text(encoding="utf-8"))
    rows = (to_row(c["messages"], max_turns) for c in conversations.values())
    return [row for row in rows if row is not None]




def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--train", type=int, default=1000, help="conversations in training.jsonl")
    parser.add_argument("--validation", type=int, default=100, help="conversations in validation.jsonl")
    parser.add_argument("--max-turns", type=int, default=8, help="keep at most this many turns per conversation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="corpus path (default: from the package)")
    args = parser.parse_args(argv)
    if args.max_turns < 2:
        parser.error("--max-turns must be >= 2 (one user and one assistant turn)")

    path = args.json or find_dataset_json()
    rows = read_rows(path, args.max_turns)
    print(f"{path}: {len(rows)} conversations with at least one user/assistant exchange")
    if args.train + args.validation > len(rows):
        raise ValueError(f"asked for {args.train + args.validation} conversations but only {len(rows)} are usable")
    random.Random(args.seed).shuffle(rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    parts = {"training": rows[: args.train], "validation": rows[args.train : args.train + args.validation]}
    for name, part in parts.items():
        write_jsonl(args.output_dir / f"{name}.jsonl", part)
        counts[name] = len(part)
        turns = sum(len(r["messages"]) for r in part)
        print(f"{name}.jsonl: {len(part)} conversations, {turns} messages")
    return counts


if __name__ == "__main__":
    main()
