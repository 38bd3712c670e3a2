"""A bAbI-style story task generated offline, in the spirit of the paper's CatbAbI experiment (appendix, Figure 13).

People move between rooms and pick up and drop objects; questions ask where a person or an object is. The answer
to "where is the apple ?" depends on who picked it up and where they went since, so answering needs the state of a
small world tracked through the whole story. Stories are plain text with the answers inline, for training an
ordinary causal LM:

    the apple is in the kitchen . ... mary went to the kitchen . mary picked up the apple . mary went to the garden .
    where is the apple ? garden .

Everything is seeded (`random.Random(seed)`), so the same arguments give the same corpus.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from implicit_lm.files import atomic_write
from implicit_lm.tasks.tokenizer import word_level_tokenizer

PEOPLE = ("mary", "john", "sandra", "daniel")


ROOMS = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway")


OBJECTS = ("apple", "football", "milk", "book")


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass
class World:
    """Where everyone and everything is. An object is either held by a person or lying in a room."""

    person_room: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)
    object_room: dict[str, str] = field(default_factory=dict)

    def where(self, entity: str) -> str | None:
        if entity in PEOPLE:
            return self.person_room.get(entity)
        if entity in self.holder:
            return self.person_room[self.holder[entity]]
        return self.object_room.get(entity)

    def apply(self, sentence: str) -> None:
        """Update the world from one opening or event sentence (the inverse of `_event`)."""
        words = sentence.split()
        person = words[0]
        if words[0] == "the":  # "the apple is in the kitchen ."
            self.object_room[words[1]] = words[-2]
        elif words[1] == "went":
            self.person_room[person] = words[-2]
        elif words[1] == "picked":
            self.holder[words[-2]] = person
            self.object_room.pop(words[-2], None)
        elif words[1] == "dropped":
            obj = words[-2]
            del self.holder[obj]
            self.object_room[obj] = self.person_room[person]
        else:
            raise ValueError(f"not an event: {sentence!r}")


@dataclass
class Question:
    """A question asked after `events_before` events, and its one-word answer (a room)."""

    events_before: int
    text: str
    answer: str


@dataclass
class Story:
    """`opening` places the objects ("the apple is in the kitchen ."); `events` follow; `questions` are asked between
    events."""

    opening: list[str]
    events: list[str]
    questions: list[Question]

    def text(self) -> str:
        """The story with each question and its answer inline, as an LM trains on it."""
        parts, asked = list(self.opening), {q.events_before: [] for q in self.questions}
        for question in self.questions:
            asked[question.events_before].append(question)
        for index in range(len(self.events) + 1):
            for question in asked.get(index, []):
                parts.append(f"{question.text} {question.answer} .")
            if index < len(self.events):
                parts.append(self.events[index])
        return " ".join(parts)

    def prompt(self, question: Question) -> str:
        """The story up to and including `question`, ending just before its answer (earlier answers included)."""
        earlier = [q for q in self.questions if q.events_before < question.events_before]
        story = Story(self.opening, self.events[: question.events_before], earlier)
        prefix = story.text()
        return f"{prefix} {question.text}".strip()


def _event(rng: random.Random, world: World) -> str:
    """A random event that is possible in `world`: someone moves, or picks up an object in their room, or drops one."""
    person = rng.choice(PEOPLE)
    room = world.person_room.get(person)
    held = [o for o, p in world.holder.items() if p == person]
    here = [o for o in OBJECTS if room is not None and world.object_room.get(o) == room]
    choices = ["move"] * 3 + (["pick"] * 2 if here else []) + (["drop"] if held else [])
    action = rng.choice(choices) if room is not None else "move"
    if action == "move":
        return f"{person} went to the {rng.choice([r for r in ROOMS if r != room])} ."
    if action == "pick":
        return f"{person} picked up the {rng.choice(here)} ."
    return f"{person} dropped the {rng.choice(held)} ."


def generate_story(rng: random.Random, num_events: int, questions: int = 1) -> Story:
    """A story of `num_events` events with `questions` questions about entities whose place the text so far
    determines, the last one after the final event. It opens by placing every object in a random room."""
    if num_events < 1 or questions < 1:
        raise ValueError(f"num_events and questions must be positive, got {num_events} and {questions}")
    world = World()
    opening = [f"the {o} is in the {rng.choice(ROOMS)} ." for o in OBJECTS]
    for sentence in opening:
        world.apply(sentence)
    events, asked = [], []
    ask_after = set(sorted(rng.sample(range(1, num_events), min(questions - 1, num_events - 1)))) | {num_events}
    for index in range(1, num_events + 1):
        sentence = _event(rng, world)
        world.apply(sentence)
        events.append(sentence)
        if index in ask_after:
            known = [e for e in (*PEOPLE, *OBJECTS) if world.where(e) is not None]
            entity = rng.choice(known)
            text = f"where is {entity} ?" if entity in PEOPLE else f"where is the {entity} ?"
            asked.append(Question(index, text, world.where(entity)))
    return Story(opening, events, asked)


def generate_stories(num_stories: int, min_events: int, max_events: int, seed: int, questions: int = 1) -> list[Story]:
    if not 1 <= min_events <= max_events:
        raise ValueError(f"need 1 <= min_events <= max_events, got {min_events} and {max_events}")
    rng = random.Random(seed)
    return [generate_story(rng, rng.randint(min_events, max_events), questions) for _ in range(num_stories)]


def write_stories(path: Path, stories: list[Story]) -> None:
    """JSONL, one `{"text", "events"}` record per story (the form `training.finetune --data` reads), atomically."""
    lines = "".join(json.dumps({"text": story.text(), "events": len(story.events)}) + "\n" for story in stories)
    atomic_write(path, lambda temporary: temporary.write_text(lines))


def vocabulary() -> list[str]:
    """Every word a story can contain (the tokenizer's word list): the generator's sentences are closed over it."""
    words = {"went", "to", "the", "picked", "up", "dropped", "where", "is", "in", ".", "?"}
    return [*SPECIAL_TOKENS, *sorted(words | set(PEOPLE) | set(ROOMS) | set(OBJECTS))]


def story_tokenizer() -> Any:
    """A word-level tokenizer over `vocabulary()` (see `word_level_tokenizer`), left-padding, as a transformers fast
    tokenizer."""
    specials = dict(zip(("pad_token", "bos_token", "eos_token", "unk_token"), SPECIAL_TOKENS, strict=True))
    return word_level_tokenizer(vocabulary(), specials, padding_side="left")
