"""The model contract on both sides of transformers 5.24's `past_key_values` -> `cache` rename (CI runs this file on
the newest transformers and on the floor version): both argument names, the output's cache field, no deprecation
warnings, generate() without a default DynamicCache, and transformers' own config validation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import transformers
from conftest import tiny_mamba2_config
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import modeling_implicit as mi
from modeling_implicit.compat import CACHE_NAME, output_cache


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def transformers_log() -> Iterator[CaptureLogger]:
    """Everything transformers logs inside the block, also messages it already logged once in this process."""
    hf_logging.warning_once.cache_clear()
    with CaptureLogger(hf_logging.get_logger("transformers")) as captured:
        yield captured


def test_the_cache_name_is_the_one_transformers_uses():
    fields = transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_NAME in fields
    assert CACHE_NAME in mi.ImplicitCausalLMOutput.__dataclass_fields__
    assert CACHE_NAME in mi.ImplicitModelOutput.__dataclass_fields__
    # The private hook generate() asks before building a DynamicCache: if a release drops it, this fails first.
    assert hasattr(transformers.GenerationMixin, "_supports_default_dynamic_cache")
    assert not mi.ImplicitMamba2ForCausalLM._supports_default_dynamic_cache()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_either_name_without_warnings(make_model, name):
    model = make_model()
    tokens = ids()
    with torch.no_grad():
        first = model(tokens[:, :-1], use_cache=True)
        cache = output_cache(first)
        assert isinstance(cache, mi.ImplicitCache) and first[CACHE_NAME] is cache
        with transformers_log() as log, warnings.catch_warnings():
            warnings.simplefilter("error")
            step = model(tokens[:, -1:], use_cache=True, **{name: cache})
        full = model(tokens).logits
    assert "deprecated" not in log.out, log.out
    assert output_cache(step) is cache and cache.get_seq_length() == tokens.shape[1]
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_the_old_output_attribute_still_answers(make_model):
    with torch.no_grad():
        out = make_model()(ids(), use_cache=True)
    assert out.past_key_values is output_cache(out) is not None  # transformers' alias (warns on >= 5.24)


def test_passing_two_different_caches_is_an_error(make_model):
    model = make_model()
    with torch.no_grad():
        one, two = (output_cache(model(ids(), use_cache=True)) for _ in range(2))
        with pytest.raises(ValueError, match="Pass the cache once"):
            model(ids(length=1), cache=one, past_key_values=two)


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=5),
        dict(num_beams=3, do_sample=False),
        dict(do_sample=False, num_return_sequences=2, num_beams=2),
        dict(do_sample=False, use_cache=False),
    ],
    ids=["greedy", "sampling", "beam", "return_sequences", "no_cache"],
)
def test_generate_logs_no_deprecation_and_matches_a_manual_loop(make_model, settings):
    model = make_model()
    tokens = ids(batch=2, length=5)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding, as pipelines and lm-eval send
    torch.manual_seed(0)
    with transformers_log() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        out = model.generate(tokens, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **settings)
    assert "deprecated" not in log.out.lower(), log.out
    copies = settings.get("num_return_sequences", 1)
    assert out.shape == (2 * copies, 9)
    if settings == dict(do_sample=False):  # greedy: the same as feeding back the argmax without generate()
        sequence = tokens.clone()
        with torch.no_grad():
            for _ in range(4):
                full_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - 5, dtype=mask.dtype)], dim=1)
                logits = model(sequence, attention_mask=full_mask).logits[:, -1]
                sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, sequence)


def test_transformers_own_config_validation_runs():
    """What transformers' validation says of its own `Mamba2Config` it says of ours: since 5.24 (or so) an
    out-of-vocabulary special token id warns; the floor's check never fires, and then neither says anything."""
    with transformers_log() as log:
        transformers.Mamba2Config(vocab_size=64, pad_token_id=1_000_003)
    expected = log.out
    with transformers_log() as log:
        tiny_mamba2_config(pad_token_id=1_000_003)
    assert log.out == expected
    if CACHE_NAME == "cache":  # the newest releases: the warning exists
        assert "pad_token_id must be `None` or an integer within the vocabulary" in expected


def test_generate_solves_the_prompt_as_a_prefill(make_model):
    """generate() builds no cache, so its first forward gets an empty one: the prompt follows `prefill_mode`, not
    `inference_mode` (set apart here by a cap too low for the simultaneous solve to converge)."""
    model = make_model(prefill_mode="sequential", inference_mode="simultaneous", eval_max_iterations=3,
                       solver="picard")
    tokens = ids(length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        out = model.generate(tokens, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        with torch.no_grad():
            prefill = model(tokens, cache=model.base_model.make_cache(), use_cache=True).logits[:, -1]
            plain = model(tokens).logits[:, -1]
    torch.testing.assert_close(out.logits[0], prefill, atol=1e-6, rtol=1e-5)  # logits_to_keep: other blocking
    assert (out.logits[0] - plain).abs().max() > 1e-3
