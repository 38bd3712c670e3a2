"""implicit-lm: implicit Mamba2 and Llama language models ("Implicit Language Models are RNNs") for transformers.

The models themselves are the remote code `modeling_implicit` (copied into every Hub repo, importable on its own).
Everything else installs under this one namespace: `implicit_lm.conversion`, `implicit_lm.eval`, `implicit_lm.training`,
`implicit_lm.model_cards`, `implicit_lm.demo`, `implicit_lm.benchmarks`, the task generators `implicit_lm.tasks`, and
the console command `implicit-lm` (`implicit_lm.cli`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("implicit-lm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
