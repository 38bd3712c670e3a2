"""`python -m implicit_lm <command> ...`: the `implicit-lm` command (see `implicit_lm.cli`)."""

from implicit_lm.cli import main

main()
