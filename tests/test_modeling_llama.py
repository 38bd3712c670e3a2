"""Implicit Llama specifics: equivalence with transformers' Llama, attention implementations, the fixed-point KV
cache, positions (the shared contract is in test_modeling_common.py)."""

import pytest
import torch
from conftest import tiny_llama, tiny_llama_config
from test_modeling_common import ids

import modeling_implicit as mi
from modeling_implicit.compat import output_cache


def reference_llama(config: mi.ImplicitLlamaConfig, attn_implementation: str):
    """transformers' LlamaForCausalLM with the same shapes and non-trivial norm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    reference_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters), rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(reference_config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return reference


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_explicit_model_reproduces_transformers_llama(attn_implementation):
    config = tiny_llama_config(implicit=False, rope_theta=10000.0)
    reference = reference_llama(config, attn_implementation)
    ours = mi.ImplicitLlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    assert ours.config._attn_implementation == attn_implementation
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and not unexpected
    tokens = ids(length=11)
    with torch.no_grad():
        expected = reference(tokens, use_cache=False).logits
        got = ours(tokens, use_cache=False).logits
        first = ours(tokens[:, :5], use_cache=True)
        streamed, cache = [first.logits], output_cache(first)
        for t in range(5, 11):
            streamed.append(ours(tokens[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(streamed, 1), expected, atol=1e-5, rtol=1e-5)
    assert ours(tokens).solver_stats is None


@pytest.mark.parametrize("inference_mode", ["simultaneous", "sequential"])
def test_eager_and_sdpa_attention_agree_with_padding(inference_mode):
    sdpa = tiny_llama(inference_mode=inference_mode)
    eager = tiny_llama(inference_mode=inference_mode, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    tokens = ids(batch=2, length=7)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = sdpa(tokens, attention_mask=mask, use_cache=False).logits
        b = eager(tokens, attention_mask=mask, use_cache=False).logits
    # Different kernels agree to rounding; the solver (tolerance 1e-6) may amplify that slightly.
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[1, 2:], b[1, 2:], atol=1e-4, rtol=1e-4)


def test_injection_feeds_queries_keys_and_values():
    model = tiny_llama()
    config = model.config
    assert config.qkv_size == (4 + 2 * 2) * 8
    assert model.model.injection.weight.shape == (config.qkv_size, config.hidden_size)
    tokens = ids(batch=1, length=5)
    with torch.no_grad():
        baseline = model(tokens, use_cache=False).logits
        for start, stop in ((0, 32), (32, 48), (48, 64)):  # the query, key and value slices
            model.model.injection.bias[start:stop] += 1.0
            changed = model(tokens, use_cache=False).logits
            model.model.injection.bias[start:stop] -= 1.0
            assert (changed - baseline).abs().max() > 1e-3, (start, stop)


def test_sequential_and_simultaneous_prefill_commit_the_same_keys_and_values():
    """Only converged keys/values are committed; at the fixed point both modes agree on them."""
    tokens = ids(length=6)
    caches = {}
    for mode in ("simultaneous", "sequential"):
        model = tiny_llama(prefill_mode=mode)
        with torch.no_grad():
            caches[mode] = output_cache(model(tokens, cache=model.model.make_cache(), use_cache=True))
    config = tiny_llama_config()
    for a, b in zip(caches["simultaneous"].states, caches["sequential"].states):
        assert a.shape == (2, config.num_key_value_heads, 6, config.head_dim)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(caches["sequential"].states) == 2 * config.num_hidden_layers


def test_masks_and_rotary_tables_are_built_once_per_call(monkeypatch):
    model = tiny_llama(inference_mode="sequential", attn_implementation="eager")
    calls = []
    build = type(model.model).prepare_stack_inputs

    def counting(self, *args, **kwargs):
        calls.append(1)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "prepare_stack_inputs", counting)
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids(length=6), attention_mask=mask, use_cache=False)
    assert len(calls) == 1
    assert out.solver_stats.iterations.shape == (2, 6) and out.solver_stats.iterations.sum() > 12


def test_crop_rolls_the_kv_cache_back():
    model = tiny_llama(prefill_mode="sequential")
    tokens = ids(length=9)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache = output_cache(model(tokens[:, :8], use_cache=True))
        assert cache.is_croppable
        cache.crop(-3)
        assert cache.get_seq_length() == 5 and cache.states[0].shape[2] == 5
        rest = model(tokens[:, 5:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="negative number"):
        cache.crop(2)


def test_decoding_attends_to_the_past_without_copying_it(monkeypatch):
    """The new token's keys/values go into scratch room after the committed ones: each evaluation attends to a view
    of the cache's buffer (no copy of the past) and the buffer grows geometrically. (That the results equal attending
    to a concatenation is the shared contract: generation equals recomputing the whole sequence.)"""
    model = tiny_llama()
    seen_keys = []
    original = mi.modeling_implicit_llama._with_past

    def spy(past, key, value):
        out = original(past, key, value)
        seen_keys.append((out[0].untyped_storage().data_ptr() == past.keys.untyped_storage().data_ptr(), past.length))
        return out

    monkeypatch.setattr(mi.modeling_implicit_llama, "_with_past", spy)
    with torch.no_grad():
        cache = output_cache(model(ids(batch=2, length=5), use_cache=True))
        capacities = []
        for step in range(12):
            model(ids(batch=2, length=1, seed=step), cache=cache, use_cache=True)
            capacities.append(cache.capacity)
    assert seen_keys and all(view for view, _ in seen_keys)
    assert cache.get_seq_length() == 17 and all(s.shape[2] == 17 for s in cache.states)
    assert capacities[-1] < 2 * 17 + 2 and len(set(capacities)) <= 3  # a few reallocations, not one per token


def test_sequential_solve_with_gradients_concatenates_instead_of_writing():
    """With a tape, writing the scratch room in place would clobber tensors saved for backward."""
    model = tiny_llama(inference_mode="sequential")
    tokens = ids(batch=1, length=4)
    out = model(tokens)  # eval mode, grad enabled: phantom steps per token against the growing cache
    out.logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_explicit_position_ids():
    model = tiny_llama()
    tokens = ids(batch=1, length=5)
    with torch.no_grad():
        default = model(tokens, use_cache=False).logits
        explicit = model(tokens, position_ids=torch.arange(5)[None], use_cache=False).logits
        shifted = model(tokens, position_ids=torch.arange(3, 8)[None], use_cache=False).logits
        gapped = model(tokens, position_ids=torch.tensor([[0, 1, 2, 3, 9]]), use_cache=False).logits
    torch.testing.assert_close(explicit, default)
    torch.testing.assert_close(shifted, default, atol=1e-5, rtol=1e-5)  # rotary attention sees relative positions
    torch.testing.assert_close(gapped[:, :4], default[:, :4], atol=1e-5, rtol=1e-5)
    assert (gapped[:, 4] - default[:, 4]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(tokens, position_ids=torch.arange(4)[None])


def test_positions_beyond_the_context_extrapolate_with_a_warning():
    model = tiny_llama(max_position_embeddings=8)
    tokens = ids(batch=1, length=12)
    with torch.no_grad():
        within = model(tokens[:, :8], use_cache=False).logits
        with pytest.warns(mi.LengthExtrapolationWarning, match="max_position_embeddings"):
            beyond = model(tokens, use_cache=False).logits
    assert torch.isfinite(beyond).all()
    torch.testing.assert_close(beyond[:, :8], within, atol=1e-4, rtol=1e-4)  # causal: the prefix is unchanged


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_attention_heads": 5}, "num_attention_heads=5: must be a divisor of hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3: must be a divisor of num_attention_heads"),
        ({"num_attention_heads": 0}, "num_attention_heads=0"),
        ({"head_dim": 7}, "head_dim=7: must be even"),
        ({"hidden_act": "swish_typo"}, "hidden_act"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"rope_parameters": {"rope_type": "nope"}}, "rope_type"),
    ],
)
def test_bad_llama_config_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_llama_config(**overrides)


def test_flash_attention_2_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash-attn is CUDA-only and not installed here")
    if not torch.cuda.is_available():
        pytest.skip("flash attention needs a CUDA device")
    sdpa = tiny_llama().to("cuda", torch.bfloat16)
    flash = tiny_llama(attn_implementation="flash_attention_2").to("cuda", torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    tokens = ids(batch=2, length=7).cuda()
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], device="cuda")
    for model in (sdpa, flash):
        model.config.tolerance = 1e-2
    with torch.no_grad():
        a = sdpa(tokens, attention_mask=mask, use_cache=False).logits
        b = flash(tokens, attention_mask=mask, use_cache=False).logits
        generated_a = sdpa.generate(tokens, attention_mask=mask, max_new_tokens=4, do_sample=False)
        generated_b = flash.generate(tokens, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert (a[0] - b[0]).abs().max() < 0.1 and (a[1, 2:] - b[1, 2:]).abs().max() < 0.1
    assert generated_a.shape == generated_b.shape
