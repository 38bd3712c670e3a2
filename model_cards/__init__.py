"""Model cards for the Hub repos of converted implicit-LM checkpoints.

`render_model_card(config, repo_id=..., preset=...)` writes a README.md with Hub metadata, usage, the architecture
and solver configuration, the paper's training recipe and, for a paper checkpoint, the results the paper reports for
it (`PAPER_RESULTS`, `PAPER_ARCHITECTURES`). `render_demo_model_card` writes the card of a small model trained by one
of the package's experiments (the bundled `models/`). `validate_model_card(text)` checks a card's metadata offline.
"""

from .paper_results import PAPER_ARCHITECTURES, PAPER_RESULTS, PRESETS
from .render import render_demo_model_card, render_model_card, validate_model_card

__all__ = [
    "PAPER_ARCHITECTURES", "PAPER_RESULTS", "PRESETS", "render_demo_model_card", "render_model_card",
    "validate_model_card",
]
