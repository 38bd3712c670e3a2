"""The synthetic tasks, generated offline and seeded, that evaluation and training both draw from: word problems over
S5, A5 and the mixed monoid (`word_problems`), bAbI-style stories (`stories`), and their word-level tokenizers."""

from implicit_lm.tasks.stories import generate_stories, generate_story, story_tokenizer
from implicit_lm.tasks.word_problems import element_names, mixed_word_problem, word_problem, word_problem_tokenizer

__all__ = [
    "element_names",
    "generate_stories",
    "generate_story",
    "mixed_word_problem",
    "story_tokenizer",
    "word_problem",
    "word_problem_tokenizer",
]
