"""Generate a synthetic chat JSONL for the data-preparation benchmark (docs/benchmarks.md, "Data preparation").

Each record has a system prompt and 1-3 user/assistant turns of random English-like text, about 300-700
SmolLM2 tokens per example (50,000 examples ~ 96 MB). Deterministic for a given --seed.

    python3 bench/make_chat_data.py --examples 50000 --out /tmp/chat50k.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = (
    "the model learns from data and each step changes the weights a little so that the loss goes down over time "
    "a careful engineer checks the memory plan before renting a card because an idle GPU costs money every hour "
    "tokens batches gradients optimizer schedule warmup cosine adapter rank alpha dropout layer attention head "
    "kitchen river mountain garden window letter market station village forest summer winter morning evening "
    "quickly slowly quietly clearly simply gently rarely often always never perhaps certainly however therefore "
    "build measure explain compare describe improve reduce increase follow check write read answer question "
    "small large early late simple complex useful careful honest bright narrow wide ancient modern local global"
).split()
SYSTEMS = [
    "You are a helpful assistant. Answer clearly and briefly.",
    "You are a patient teacher who explains each step.",
    "You are a concise technical writer. Prefer short sentences.",
    "You answer in a friendly tone and give one example.",
]


SYLLABLES = "ka ro tel mi zu ven ash por li qua dex ny sol bri um ta ge fo".split()


def word(rng: random.Random) -> str:
    """Mostly common words; some numbers and made-up names so the text tokenises like real chat (~3.8 bytes a token)."""
    kind = rng.random()
    if kind < 0.08:
        return str(rng.randint(0, 99999))
    if kind < 0.24:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    return rng.choice(WORDS)


def sentence(rng: random.Random) -> str:
    words = [word(rng) for _ in range(rng.randint(6, 18))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def paragraph(rng: random.Random, n_words: int) -> str:
    out, count = [], 0
    while count < n_words:
        s = sentence(rng)
        out.append(s)
        count += s.count(" ") + 1
    return " ".join(out)


def example(rng: random.Random) -> dict:
    turns = rng.randint(1, 3)
    budget = rng.randint(140, 340) // turns  # words over the whole conversation (~1.2 tokens a word)
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}]
    for _ in range(turns):
        messages.append({"role": "user", "content": paragraph(rng, max(8, budget // 4))})
        messages.append({"role": "assistant", "content": paragraph(rng, max(16, budget * 3 // 4))})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.examples):
            f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
