"""The demo's bundled dataset: Kestrel Bikes' support bot, written by this project.

Kestrel Bikes is a fictional bike shop. Its support bot answers in a fixed house style (see
:mod:`onecard.demo.style`): a greeting line, one short sentence, a sign-off line. SmolLM2-135M-Instruct never
answers like that on its own, so the task measures what fine-tuning adds, not what the base model knows.

The examples are generated from the templates below (topics x question phrasings x products) and committed
as ``onecard/assets/demo/{train,heldout}.jsonl``; ``python -m onecard.demo.dataset`` rewrites them and a test
checks the committed files match. Held-out questions are disjoint from training questions: they ask about
products never seen in training, or use phrasings never seen in training (the last phrasing of each topic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from onecard.demo.style import format_answer

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
TRAIN_FILE, HELDOUT_FILE = ASSETS / "train.jsonl", ASSETS / "heldout.jsonl"
SEED, TRAIN_SIZE, HELDOUT_SIZE = 1234, 160, 24

TRAIN_PRODUCTS = ["Swift road bike", "Trailhawk mountain bike", "Volt e-bike", "Pebble kids' bike",
                  "Metro commuter bike", "Glide gravel bike"]
HELDOUT_PRODUCTS = ["Summit hardtail", "Breeze cruiser"]

# topic: (question phrasings -- the last one is held out --, the one-sentence answer)
TOPICS: dict[str, tuple[list[str], str]] = {
    "shipping": (["How long does shipping take for the {p}?", "When will my {p} arrive?",
                  "How fast can you ship a {p} to me?"],
                 "The {p} ships within 2 business days and usually arrives 3 to 5 days later."),
    "returns": (["Can I return my {p}?", "What is your return policy for the {p}?",
                 "I don't like my {p}, can I send it back?"],
                "You can return an unused {p} within 30 days for a full refund."),
    "warranty": (["Is the {p} under warranty?", "How long is the warranty on the {p}?",
                  "What does the warranty on my {p} cover?"],
                 "The {p} frame has a lifetime warranty and its parts are covered for 2 years."),
    "sizing": (["What size {p} should I get?", "How do I pick the right frame size for the {p}?",
                "I'm 175 cm tall, which {p} size fits me?"],
               "Use the size chart on the {p} page, which matches frame size to your height and inseam."),
    "assembly": (["Does the {p} come assembled?", "How hard is it to assemble the {p}?",
                  "Do I need tools to set up my new {p}?"],
                 "The {p} arrives 90 percent assembled, and the included multitool is all you need."),
    "service": (["How often should I service my {p}?", "What maintenance does the {p} need?",
                 "When should my {p} get a tune-up?"],
                "Give your {p} a tune-up every 6 months or 1,000 km, whichever comes first."),
    "tires": (["What tire pressure should I use on the {p}?", "How much air goes in the {p} tires?",
               "My {p} tires feel soft, how hard should I pump them?"],
              "Pump the {p} tires to the pressure range printed on the tire sidewall."),
    "payment": (["Can I pay for the {p} in installments?", "Do you offer financing on the {p}?",
                 "Is there a monthly payment plan for the {p}?"],
                "Yes, you can split the {p} into 4 interest-free payments at checkout."),
    "price_match": (["Do you price match on the {p}?", "I found the {p} cheaper elsewhere, can you match it?",
                     "Will you beat another shop's price for the {p}?"],
                    "We match any authorized dealer's lower price on the {p} within 14 days of purchase."),
    "test_ride": (["Can I test ride the {p}?", "Where can I try the {p} before buying?",
                   "Is it possible to ride a {p} in a store first?"],
                  "You can book a free test ride of the {p} at any Kestrel store."),
    "tracking": (["Where is my {p} order?", "How do I track my {p} delivery?",
                  "My {p} has not arrived yet, where is it?"],
                 "Your tracking link for the {p} is in your shipping confirmation email."),
    "lights": (["Does the {p} come with lights?", "Are lights included with the {p}?",
                "Do I have to buy lights separately for my {p}?"],
               "The {p} ships with a front and rear light set included."),
    "weight_limit": (["What is the weight limit of the {p}?", "How much weight can the {p} carry?",
                      "Is the {p} strong enough for a heavy rider?"],
                     "The {p} supports a rider plus cargo of up to 120 kg in total."),
    "colors": (["What colors does the {p} come in?", "Which colours can I get the {p} in?",
                "Is the {p} available in green?"],
               "The {p} comes in Slate Grey, Forest Green and Sunset Orange."),
    "parts": (["Where can I buy spare parts for my {p}?", "Do you sell replacement parts for the {p}?",
               "I broke a pedal on my {p}, where do I get a new one?"],
              "Spare parts for the {p} are in the Parts section of our website."),
    "cleaning": (["How do I clean my {p}?", "What is the best way to wash the {p}?",
                  "My {p} is muddy, how should I clean it?"],
                 "Rinse the {p} with low-pressure water, dry it, and lube the chain again."),
}


def _record(question: str, answer: str, topic: str, product: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": format_answer(answer)}],
            "topic": topic, "product": product}


def build_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records, deterministic in ``seed``; no question appears in both."""
    train, heldout = [], []
    for topic, (phrasings, answer) in TOPICS.items():
        for product in TRAIN_PRODUCTS + HELDOUT_PRODUCTS:
            for i, phrasing in enumerate(phrasings):
                record = _record(phrasing.format(p=product), answer.format(p=product), topic, product)
                seen_phrasing = i < len(phrasings) - 1
                (train if product in TRAIN_PRODUCTS and seen_phrasing else heldout).append(record)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train[:TRAIN_SIZE], _spread(heldout, HELDOUT_SIZE)


def _spread(records: list[dict], n: int) -> list[dict]:
    """``n`` records covering the topics evenly (round-robin over topics, in shuffled order)."""
    by_topic: dict[str, list[dict]] = {}
    for record in records:
        by_topic.setdefault(record["topic"], []).append(record)
    picked: list[dict] = []
    while len(picked) < n and any(by_topic.values()):
        for topic in list(by_topic):
            if by_topic[topic] and len(picked) < n:
                picked.append(by_topic[topic].pop(0))
    return picked


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    train, heldout = build_splits()
    write_jsonl(TRAIN_FILE, train)
    write_jsonl(HELDOUT_FILE, heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out examples to {ASSETS}")


if __name__ == "__main__":
    main()
