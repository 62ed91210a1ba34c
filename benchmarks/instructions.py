"""A synthetic instruction set with exact answers, for measuring instruction tuning.

Eight kinds of instruction, each answered by one exact string: reverse a list of words, name its
first or last word, count its words, write spelled-out letters as capitals, say a word twice, look a
thing's colour up in a short given context, and add or subtract small numbers. The examples come in
the three formats ``gpt2 prepare`` reads (OpenAI's messages, prompt-completion, Alpaca's), and the
training and held-out splits share no item: no (instruction, input) pair is in both.

    python benchmarks/instructions.py OUT_DIR [--train 3000] [--held-out 200] [--seed 0]

writes OUT_DIR/train.jsonl and OUT_DIR/held_out.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = (  # noqa: SIM905 (a list of 200 literals reads worse)
    "apple river stone cloud green house table water light music bread chair window garden winter "
    "summer letter paper silver mountain forest ocean candle dream honey tiger rabbit horse mirror "
    "pencil orange yellow purple market castle bridge island planet rocket shadow thunder flower "
    "butter coffee basket hammer ladder pillow blanket button carpet dragon engine feather ginger "
    "jacket kitten lemon marble needle pepper pocket puzzle rain salt sugar tent violin wagon zebra "
    "anchor bottle cactus desert falcon glacier harbor iron jungle kettle lantern meadow nest olive "
    "parrot quilt robin saddle tunnel umbrella valley walnut yarn acorn beacon cedar dove ember fern "
    "grove hazel ivory jade kite lily maple noodle oyster pearl quartz reef spruce tulip velvet wren"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
THINGS = ["box", "cup", "hat", "bag", "pen", "car", "door", "ball", "kite", "shoe", "lamp", "bowl"]
COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "grey", "gold", "orange", "purple",
           "yellow"]

Item = tuple[str, str, str]  # instruction, input, answer


def reverse_words(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return "Reverse the order of these words.", " ".join(words), " ".join(reversed(words))


def first_word(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(2, 5))
    return "What is the first word?", " ".join(words), words[0]


def last_word(rng: random.Random) -> Item:
    words = rng.sample(WORDS, rng.randint(2, 5))
    return "What is the last word?", " ".join(words), words[-1]


def count_words(rng: random.Random) -> Item:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    return "How many words are there?", " ".join(words), str(len(words))


def capitals(rng: random.Random) -> Item:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 5))]
    return "Write these letters as capitals.", " ".join(letters), " ".join(letters).upper()


def twice(rng: random.Random) -> Item:
    word = rng.choice(WORDS)
    return "Say this word twice.", word, f"{word} {word}"


def look_up(rng: random.Random) -> Item:
    things = rng.sample(THINGS, 3)
    colours = rng.sample(COLOURS, 3)
    context = " ".join(f"The {t} is {c}." for t, c in zip(things, colours, strict=True))
    asked = rng.randrange(3)
    return f"What colour is the {things[asked]}?", context, colours[asked]


def arithmetic(rng: random.Random) -> Item:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", "", str(a - b)


KINDS: dict[str, Callable[[random.Random], Item]] = {
    "reverse": reverse_words, "first word": first_word, "last word": last_word, "count": count_words,
    "capitals": capitals, "twice": twice, "look-up": look_up, "arithmetic": arithmetic,
}


def instruction_sets(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``n_train`` and ``n_held_out`` examples, the kinds in turn, no (instruction, input) in both;
    each a dict with ``kind``, ``instruction``, ``input`` and ``output``."""
    rng = random.Random(seed)
    held_out: list[dict] = []
    seen: set[tuple[str, str]] = set()
    kinds = list(KINDS.items())
    for i in range(n_held_out):
        held_out.append(_new_item(*kinds[i % len(kinds)], rng, seen))
    train = [_new_item(*kinds[i % len(kinds)], rng, seen, allow_repeats=True) for i in range(n_train)]
    return train, held_out


def _new_item(kind: str, make: Callable[[random.Random], Item], rng: random.Random,
              seen: set[tuple[str, str]], allow_repeats: bool = False) -> dict:
    """An item of ``kind`` not held out (and, unless ``allow_repeats``, not seen at all)."""
    held = seen.copy() if allow_repeats else seen
    for _ in range(10_000):
        instruction, given, answer = make(rng)
        if (instruction, given) not in held:
            if not allow_repeats:
                seen.add((instruction, given))
            return {"kind": kind, "instruction": instruction, "input": given, "output": answer}
    raise RuntimeError(f"ran out of new {kind} items")


def drills(n: int, held_out: list[dict], seed: int = 1) -> list[dict]:
    """``n`` prompt-completion drills of the same skills, never a held-out item: what a base model
    learns the skills from, shown in another format than the chat template's (``DRILL_TEMPLATE``)."""
    rng = random.Random(seed)
    held = {(e["instruction"], e["input"]) for e in held_out}
    makers = list(KINDS.values())
    records: list[dict] = []
    while len(records) < n:
        instruction, given, answer = rng.choice(makers)(rng)
        if (instruction, given) not in held:
            records.append({"prompt": instruction + (f"\n\n{given}" if given else ""), "completion": answer})
    return records


# Drills as plain questions and answers: "Q: Say this word twice.\n\nriver\nA: river river<|endoftext|>".
DRILL_TEMPLATE = (
    "{{ eos_token }}{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\nA:"
    "{% else %}{% generation %} {{ m.content }}{{ eos_token }}{% endgeneration %}\n{% endif %}{% endfor %}"
)


def as_record(example: dict, style: int) -> dict:
    """The example in one of the three formats ``gpt2 prepare`` reads (``style`` 0, 1 or 2)."""
    question = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
    if style == 0:
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": example["output"]}]}
    if style == 1:
        return {"prompt": question, "completion": example["output"]}
    return {k: example[k] for k in ("instruction", "input", "output")}


def write_sets(out: Path, n_train: int, n_held_out: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Write ``train.jsonl`` (the formats mixed) and ``held_out.jsonl``; the held-out examples."""
    train, held_out = instruction_sets(n_train, n_held_out, seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(as_record(e, i % 3)) + "\n" for i, e in enumerate(train)))
    (out / "held_out.jsonl").write_text("".join(json.dumps(e) + "\n" for e in held_out))
    return path, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_sets(args.out, args.train, args.held_out, args.seed)


if __name__ == "__main__":
    main()
