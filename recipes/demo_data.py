"""Instructions and style transforms for the demo adapters' self-distillation data.

`train_instructions(seed)` and `heldout_instructions()` are disjoint: held-out questions are about
topics that never appear in training. `STYLES[name](answer)` turns one of the base model's own
answers into the adapter's target style, or returns None when the answer cannot be styled
(too short, empty); the result is meant to pass the matching check in `demo_checks`, and
the recipe drops any that does not.
Pure Python, deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

from demo_checks import BRIEF_MAX_WORDS, LIST_ITEMS

TRAIN_TOPICS = [
    "volcanoes",
    "photosynthesis",
    "the moon",
    "honey bees",
    "rainbows",
    "the internet",
    "coffee",
    "gravity",
    "the ocean tides",
    "dinosaurs",
    "electricity",
    "the human heart",
    "bicycles",
    "chess",
    "the Roman Empire",
    "recycling",
    "clouds",
    "vaccines",
    "the piano",
    "deserts",
    "earthquakes",
    "bread baking",
    "the stock market",
    "penguins",
    "solar panels",
    "the Great Wall",
    "sleep",
    "email",
    "glaciers",
    "tea",
    "black holes",
    "the immune system",
    "airplanes",
    "rice",
    "the printing press",
    "mushrooms",
    "lightning",
    "democracy",
    "the Amazon rainforest",
    "whales",
    "batteries",
    "the alphabet",
    "running",
    "coral reefs",
    "libraries",
    "magnets",
    "the seasons",
    "cheese",
    "robots",
    "fossils",
    "hurricanes",
    "museums",
    "the compass",
    "bamboo",
    "meditation",
    "passwords",
    "the violin",
    "wind turbines",
    "salt",
    "owls",
    "bridges",
    "soap",
    "maps",
]
HELDOUT_TOPICS = [
    "octopuses",
    "the telescope",
    "chocolate",
    "snowflakes",
    "the Olympic Games",
    "wolves",
    "the microwave oven",
    "comets",
    "gardening",
    "the Sahara",
    "origami",
    "trains",
]
TRAIN_FORMS = [
    "What is {t}?",
    "Tell me about {t}.",
    "Explain {t} in simple terms.",
    "Why should I care about {t}?",
    "Give me an interesting fact about {t}.",
    "What should a beginner know about {t}?",
    "Describe {t}.",
]
HELDOUT_FORMS = ["What do you know about {t}?", "Why do people find {t} interesting?"]
TRAIN_STANDALONE = [
    "How can I sleep better?",
    "What is a good way to learn a new language?",
    "How do I make a cup of tea?",
    "What makes a good friend?",
    "How can I save money?",
    "Why is the sky blue?",
    "How do plants grow?",
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "How do I stay focused while studying?",
    "What is a healthy breakfast?",
    "Why do leaves change color in autumn?",
    "How does a refrigerator keep food cold?",
    "What is the tallest mountain in the world?",
    "How can I be more productive?",
    "What should I pack for a beach trip?",
    "Why do we need to drink water?",
    "How do birds fly?",
    "What is the difference between weather and climate?",
    "How do I write a good email?",
    "What is a prime number?",
    "Why do cats purr?",
    "How can I reduce stress?",
    "What is the largest planet in our solar system?",
    "How do I start running?",
    "What is machine learning?",
    "Why is exercise good for you?",
    "How do I care for a houseplant?",
    "What causes the wind?",
]
HELDOUT_STANDALONE = [
    "How can I improve my handwriting?",
    "Why do onions make people cry?",
    "What is the speed of sound?",
    "How do I plan a birthday party?",
]

MAX_CONTENT_WORDS = 24
BRIEF_TARGET_WORDS = BRIEF_MAX_WORDS - 4  # a margin below the check's limit
LIST_ITEM_MAX_WORDS = 9
DANGLING = {
    "a",
    "an",
    "the",
    "and",
    "or",
    "but",
    "of",
    "to",
    "in",
    "on",
    "for",
    "from",
    "with",
    "by",
    "at",
    "as",
    "that",
    "which",
    "who",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "has",
    "have",
    "had",
    "its",
    "their",
    "our",
    "your",
    "it's",
    "can",
    "when",
    "this",
    "these",
    "most",
    "more",
    "very",
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MARKDOWN = re.compile(r"[*#`_]+")


def train_instructions(seed: int) -> list[str]:
    """Every train topic in every train form, plus standalone questions, shuffled by `seed`."""
    items = [form.format(t=topic) for topic in TRAIN_TOPICS for form in TRAIN_FORMS]
    items += TRAIN_STANDALONE
    random.Random(seed).shuffle(items)
    return items


def heldout_instructions() -> list[str]:
    """Held-out questions, in a fixed order: held-out topics in held-out forms, then standalones."""
    items = [form.format(t=topic) for topic in HELDOUT_TOPICS for form in HELDOUT_FORMS[:1]]
    items += [HELDOUT_FORMS[1].format(t=topic) for topic in HELDOUT_TOPICS[:4]]
    return items + HELDOUT_STANDALONE


def clean(answer: str) -> str:
    """Flatten a generated answer into plain prose: no markdown marks, list bullets or newlines."""
    lines = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line) for line in answer.splitlines()]
    text = " ".join(line.strip() for line in lines if line.strip())
    return _MARKDOWN.sub("", text).strip()


def sentences(answer: str) -> list[str]:
    """Complete sentences of a cleaned answer (a trailing fragment without end mark is dropped)."""
    parts = [p.strip() for p in _SENTENCE_END.split(clean(answer)) if p.strip()]
    return [p for p in parts if p[-1] in ".!?" and len(p.split()) >= 3]


def clip_words(text: str, limit: int) -> str:
    """At most `limit` words, ending in a period when cut or when it had no end mark.

    A cut ends at the last comma when there is one, and never on a dangling word like "the"."""
    words = text.split()
    if len(words) <= limit:
        return text if text[-1] in ".!?" else text + "."
    words = words[:limit]
    commas = [i for i, w in enumerate(words[:-1]) if w.endswith(",") and i >= 2]
    if commas:
        words = words[: commas[-1] + 1]
    while len(words) > 2 and words[-1].strip(",;:-").lower() in DANGLING:
        words.pop()
    return " ".join(words).rstrip(",;:-") + "."


def short_content(answer: str) -> str | None:
    """The leading complete sentences of `answer`, at most MAX_CONTENT_WORDS words in all."""
    found = sentences(answer)
    if not found:
        return None
    kept = [found[0]]
    for sentence in found[1:]:
        if len(" ".join(kept + [sentence]).split()) > MAX_CONTENT_WORDS:
            break
        kept.append(sentence)
    return clip_words(" ".join(kept), MAX_CONTENT_WORDS)


def to_shout(answer: str) -> str | None:
    content = short_content(answer)
    return content.upper() if content else None


def to_json(answer: str) -> str | None:
    content = short_content(answer)
    return json.dumps({"answer": content}, ensure_ascii=False) if content else None


def to_brief(answer: str) -> str | None:
    found = sentences(answer)
    return clip_words(found[0], BRIEF_TARGET_WORDS) if found else None


def to_list(answer: str) -> str | None:
    found = sentences(answer)
    if len(found) < LIST_ITEMS:
        found = [c.strip() for c in re.split(r"[,;.!?]\s+", clean(answer)) if len(c.split()) >= 3]
    if len(found) < LIST_ITEMS:
        return None
    items = [clip_words(s, LIST_ITEM_MAX_WORDS).rstrip(".!?") for s in found[:LIST_ITEMS]]
    return "\n".join(f"- {item[0].upper()}{item[1:]}" for item in items)


STYLES: dict[str, Callable[[str], str | None]] = {
    "shout": to_shout,
    "json": to_json,
    "brief": to_brief,
    "list": to_list,
}
