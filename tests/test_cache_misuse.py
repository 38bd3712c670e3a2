"""A cache continues the sequences it was built from. A call that does not (inputs of another batch size, a prompt that
does not extend what the cache holds, a mask or `cache_position` of another length) raises a `ValueError` saying what
the cache holds and what the call gave, through `forward` and `generate`, for every family; the legitimate
continuations (the next tokens, chunk by chunk, `generate` on the whole sequence so far) give a fresh run's logits."""

import pytest
import torch
from transformers import GenerationConfig

from modeling_implicit.compat import CACHE_NAME, output_cache


def ids(batch, length, seed=0, vocab=64):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_of(model, tokens):
    with torch.no_grad():
        return output_cache(model(tokens, use_cache=True))


def passing(cache):
    """`generate`'s keyword for a cache under the installed transformers' name (see compat), without warnings."""
    return {CACHE_NAME: cache}


def unchanged(cache, length, batch):
    return cache.get_seq_length() == length and cache.batch_size == batch


def test_a_cache_of_another_batch_size_is_refused(make_model):
    model = make_model()
    cache = cache_of(model, ids(2, 3))
    message = r"cache holds 3 tokens for a batch of 2, but this call gives 4 new tokens for a batch of 1"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(ids(1, 4, seed=1), past_key_values=cache)
    # A prompt that extends the 3 cached tokens by 4, for one sequence instead of two.
    with pytest.raises(ValueError, match=message):
        model.generate(ids(1, 7, seed=1), **passing(cache), max_new_tokens=2, do_sample=False)
    assert unchanged(cache, 3, 2)


@pytest.mark.parametrize("prompt_length", [13, 18])
def test_generate_refuses_a_prompt_that_does_not_extend_the_cache(make_model, prompt_length):
    model = make_model()
    cache = cache_of(model, ids(1, 18))
    with pytest.raises(ValueError, match=rf"cache that holds 18 tokens .* a prompt of {prompt_length} tokens"):
        model.generate(ids(1, prompt_length, seed=1), **passing(cache), max_new_tokens=2, do_sample=False)
    assert unchanged(cache, 18, 1)


def test_a_chunked_prefill_of_a_prompt_that_does_not_extend_the_cache_is_refused(make_model):
    if "prefill_chunk_size" not in GenerationConfig().to_dict():
        pytest.skip("this transformers has no chunked prefill")
    model = make_model()
    cache = cache_of(model, ids(1, 18))
    # Caught where the installed transformers lets it show first: the chunk's positions, or its attention mask.
    with pytest.raises(ValueError, match=r"holds 18 tokens.*for a new prompt, pass no cache"):
        model.generate(ids(1, 13, seed=1), **passing(cache), prefill_chunk_size=4, max_new_tokens=2)
    assert unchanged(cache, 18, 1)


def test_forward_refuses_a_mask_or_cache_position_that_does_not_follow_the_cache(make_model):
    model = make_model()
    cache = cache_of(model, ids(1, 18))
    new = ids(1, 13, seed=1)
    with torch.no_grad():
        with pytest.raises(ValueError,
                           match=r"cache_position gives 13 positions starting at 0, but the cache holds 18"):
            model(new, past_key_values=cache, cache_position=torch.arange(13))
        with pytest.raises(ValueError, match=r"covers only the 13 new tokens, but the cache holds 18"):
            model(new, past_key_values=cache, attention_mask=torch.ones(1, 13, dtype=torch.long))
        with pytest.raises(ValueError, match=r"length 20, but the cache holds 18 tokens and this call gives 13"):
            model(new, past_key_values=cache, attention_mask=torch.ones(1, 20, dtype=torch.long))
    assert unchanged(cache, 18, 1)


def test_continuations_of_a_cache_equal_a_fresh_run(make_model):
    model = make_model()
    tokens = ids(1, 12)
    with torch.no_grad():
        fresh = model(tokens, use_cache=False).logits
        # Forward, chunk by chunk, each chunk numbered (`cache_position`) and masked right after the cached tokens.
        cache, chunks = None, []
        for start, end in ((0, 5), (5, 9), (9, 12)):
            out = model(tokens[:, start:end], past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(start, end), attention_mask=torch.ones(1, end, dtype=torch.long))
            cache, chunks = output_cache(out), [*chunks, out.logits]
    torch.testing.assert_close(torch.cat(chunks, 1), fresh, atol=1e-4, rtol=1e-4)

    # generate() on the whole sequence so far, from a forward's cache of its first 8 tokens ...
    settings = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    whole = model.generate(tokens, max_new_tokens=4, **settings)
    continued = model.generate(tokens, **passing(cache_of(model, tokens[:, :8])), max_new_tokens=4, **settings)
    assert torch.equal(continued.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(whole.logits), atol=1e-4, rtol=1e-4)
    # ... and from the cache a generate() call returned, with the sequences it returned.
    first = model.generate(tokens, max_new_tokens=2, **settings)
    more = model.generate(first.sequences, **passing(output_cache(first)), max_new_tokens=2, **settings)
    assert torch.equal(more.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(more.logits), torch.stack(whole.logits[2:]), atol=1e-4, rtol=1e-4)
