"""A small, deterministic, English-like corpus built in code.

Examples and tests need text that a tiny model can learn in a few hundred steps and
that needs no download. Documents are short stories assembled from fixed word lists
with a toy grammar (subject-verb agreement, a recurring protagonist per document,
a handful of sentence templates), so there is real structure to learn.

Document ``i`` depends only on ``(seed, i)``: asking for more documents appends to
the corpus and never changes the earlier ones.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator

NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry",
    "Iris", "Jack", "Lena", "Max", "Nora", "Oscar", "Paula", "Sam",
)
# (singular, plural) pairs so the grammar can make verbs agree with subjects.
NOUNS = (
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"),
    ("teacher", "teachers"), ("farmer", "farmers"), ("baker", "bakers"),
    ("horse", "horses"), ("fox", "foxes"), ("friend", "friends"),
    ("neighbour", "neighbours"), ("sailor", "sailors"),
)
THINGS = (
    "apple", "book", "letter", "basket", "cake", "lamp", "map", "ball",
    "hat", "key", "bottle", "flower", "stone", "coat", "box", "song",
)
PLACES = (
    "garden", "kitchen", "market", "river", "forest", "village", "school",
    "harbour", "library", "field", "bridge", "hill",
)
ADJECTIVES = (
    "small", "old", "happy", "quiet", "bright", "tired", "clever", "brave",
    "young", "busy", "kind", "curious",
)
COLOURS = ("red", "blue", "green", "yellow", "white", "brown")
# (third person singular, plural/base, past) forms of transitive verbs.
VERBS = (
    ("finds", "find", "found"), ("carries", "carry", "carried"),
    ("opens", "open", "opened"), ("sees", "see", "saw"),
    ("buys", "buy", "bought"), ("gives", "give", "gave"),
    ("hides", "hide", "hid"), ("paints", "paint", "painted"),
)
# (third person singular, plural/base, past) forms of motion verbs.
MOTIONS = (
    ("walks", "walk", "walked"), ("runs", "run", "ran"),
    ("goes", "go", "went"), ("hurries", "hurry", "hurried"),
)
TIMES = ("In the morning", "At noon", "In the evening", "Later", "The next day", "At night")
WEATHER = ("sunny", "cold", "warm", "windy", "rainy", "calm")
FEELINGS = ("happy", "surprised", "sad", "proud", "sleepy", "glad")


class _Story:
    """Sentence generator for one document; keeps the protagonist and tense fixed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.hero = rng.choice(NAMES)
        self.place = rng.choice(PLACES)
        self.past = rng.random() < 0.5

    def _verb(self, forms: tuple[str, str, str], plural: bool) -> str:
        if self.past:
            return forms[2]
        return forms[1] if plural else forms[0]

    def _subject(self) -> tuple[str, bool]:
        """A subject phrase and whether it is plural."""
        r = self.rng.random()
        if r < 0.4:
            return self.hero, False
        singular, plural_form = self.rng.choice(NOUNS)
        adjective = self.rng.choice(ADJECTIVES)
        if r < 0.7:
            return f"the {adjective} {singular}", False
        return f"the {adjective} {plural_form}", True

    def _object(self) -> str:
        thing = self.rng.choice(THINGS)
        if self.rng.random() < 0.5:
            return f"a {self.rng.choice(COLOURS)} {thing}"
        return f"the {thing}"

    def sentence(self) -> str:
        rng = self.rng
        kind = rng.randrange(6)
        subject, plural = self._subject()
        if kind == 0:
            text = f"{subject} {self._verb(rng.choice(VERBS), plural)} {self._object()}"
        elif kind == 1:
            place = rng.choice(PLACES + (self.place,))
            text = f"{subject} {self._verb(rng.choice(MOTIONS), plural)} to the {place}"
        elif kind == 2:
            text = (f"{rng.choice(TIMES)}, {subject} "
                    f"{self._verb(rng.choice(VERBS), plural)} {self._object()} "
                    f"at the {self.place}")
        elif kind == 3:
            be = ("were" if plural else "was") if self.past else ("are" if plural else "is")
            text = f"{subject} {be} {rng.choice(FEELINGS)}"
        elif kind == 4:
            be = "was" if self.past else "is"
            text = f"the weather {be} {rng.choice(WEATHER)} at the {self.place}"
        else:
            other = rng.choice([n for n in NAMES if n != self.hero])
            verb = self._verb(("gives", "give", "gave"), False)
            text = f"{self.hero} {verb} {self._object()} to {other}"
        return text[0].upper() + text[1:] + "."


def generate_document(seed: int, index: int) -> str:
    """Document ``index`` of the corpus for ``seed``; independent of all other documents."""
    rng = random.Random(f"megatron-sample-corpus:{seed}:{index}")
    story = _Story(rng)
    count = rng.randint(3, 9)
    return " ".join(story.sentence() for _ in range(count))


def generate_documents(num_docs: int, seed: int = 1234) -> Iterator[str]:
    """Documents ``0 .. num_docs-1`` in order."""
    if num_docs < 0:
        raise ValueError(f"num_docs must be >= 0, got {num_docs}")
    for index in range(num_docs):
        yield generate_document(seed, index)


def write_sample_corpus(path: str | os.PathLike, num_docs: int, seed: int = 1234) -> str:
    """Write ``num_docs`` documents as JSON lines ``{"text": ...}`` and return the path.

    The file is written under a temporary name and renamed, so a reader never sees a
    half-written corpus.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as out:
        for text in generate_documents(num_docs, seed):
            out.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp_path, path)
    return path
