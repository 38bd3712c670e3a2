"""Word-level tokenizers: one token per word, for the synthetic tasks' closed vocabularies."""

from __future__ import annotations

from typing import Any

WORD_PREFIX = "\u2581"  # the mark of a word's leading space in a word-level tokenizer's vocabulary



def word_level_tokenizer(words: list[str], special_tokens: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """A transformers fast tokenizer with one token per word (`words[i]` has id `i`; text is split on whitespace).

    Every word decodes with its leading space, as a GPT-2 continuation token does: `decode` of any ids is
    `" w1 w2 ..."`, so `pipeline("text-generation")`'s prompt + generated text reads `"... w1 w2"` instead of gluing
    the first generated word to the prompt's last. `special_tokens` (`{"pad_token": "<pad>", ...}`, each among
    `words`) match as written and decode without a space; with an `unk_token` unknown words map to it, without one
    they are an error.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_tokens = special_tokens or {}
    specials = set(special_tokens.values())
    vocabulary = {(word if word in specials else WORD_PREFIX + word): index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=special_tokens.get("unk_token")))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=WORD_PREFIX, prepend_scheme="always", split=False),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_PREFIX, prepend_scheme="never")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **special_tokens, **kwargs
    )
