"""What differs between the transformers releases the remote code supports (5.10.1 to the newest; CI tests the floor
and the newest), in one place. Every difference is detected by what the installed transformers has, never by its
version string.

- The cache's name. transformers 5.24 renamed `past_key_values` (and Mamba's `cache_params`) to `cache`: in the
  output dataclasses (whose `__init__` renames the old keyword, with a deprecation warning), in `forward` signatures
  and in `prepare_inputs_for_generation`. Our outputs subclass transformers' own, so they carry the cache under the
  installed name (`CACHE_NAME`) and keep the `.past_key_values` alias wherever transformers has it; `forward` takes
  both names, without warnings.
- The one private hook: `GenerationMixin._supports_default_dynamic_cache` (checked on 5.10.1, 5.17.0, 5.23.0, 5.24.0 and
  5.25.0). Returning False makes `generate()` build no `DynamicCache`, as for transformers' own recurrent models; the
  causal LM's `prepare_inputs_for_generation` hands the first forward an empty cache of ours instead, after the inputs
  were expanded for beams and `num_return_sequences`, and `generate()` carries it on from the outputs. Before 5.24 the
  hook also returned False for any class with `_is_stateful`; 5.24 dropped that rule, hence the override.

What only the training side needs (the name of activation checkpointing) lives with it, in `training/finetune.py`:
this module ships in every Hub repo.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The field and keyword under which the installed transformers passes a model's cache."""

def cache_field(cache: Any) -> dict[str, Any]:
    """Keyword arguments that put `cache` into a transformers output under the installed name."""
    return {CACHE_NAME: cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (None when it carries none), under either name and without warnings."""
    return getattr(outputs, CACHE_NAME, None)


def cache_argument(cache: Any, past_key_values: Any) -> Any:
    """The cache a `forward` call was given, under the new name (`cache`) or the old one (`past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


class RecurrentGenerationMixin:
    """Tells `generate()` not to build a `DynamicCache`: the model builds its own cache on the first forward."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False
