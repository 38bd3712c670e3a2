"""Outputs every transformers model gives: per-layer hidden states and attention maps of the evaluation of f whose
output the model returns, dictionary outputs of generate(), capability declarations and device_map loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_modeling_common import ids
from transformers import AutoModelForCausalLM

import modeling_implicit as mi
from modeling_implicit.compat import output_cache


def padded_ids(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = ids(batch=batch, length=length)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    return tokens, mask


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_hidden_states_are_those_of_the_returned_evaluation(make_model, family, mode):
    model = make_model(inference_mode=mode)
    config = model.config
    tokens, mask = padded_ids()
    real = mask.bool()
    with torch.no_grad():
        out = model.base_model(tokens, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        plain = model.base_model(tokens, attention_mask=mask)
    hidden = out.hidden_states
    assert len(hidden) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, config.hidden_size) for h in hidden)
    # The last entry is after the final norm: the evaluation's output, i.e. last_hidden_state.
    assert torch.equal(hidden[-1][real].to(out.last_hidden_state.dtype), out.last_hidden_state[real])
    # The first is the iterate that evaluation started from: within the tolerance of the fixed point.
    start, fixed_point = hidden[0][real].flatten(), out.last_hidden_state[real].flatten()
    assert (start - fixed_point).norm() / fixed_point.norm() < 10 * config.tolerance
    assert 0 < (hidden[1] - hidden[0])[real].abs().max()  # blocks in between are recorded, not copies
    # Asking for them changes nothing else (Llama's maps come from eager attention: same fixed point, other rounding).
    torch.testing.assert_close(out.last_hidden_state[real], plain.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    assert plain.hidden_states is None and plain.attentions is None


def test_llama_attention_maps_in_both_modes_agree():
    from conftest import tiny_llama

    model = tiny_llama()
    tokens, mask = padded_ids()
    maps = {}
    for mode in ("simultaneous", "sequential"):
        model.config.inference_mode = mode
        with torch.no_grad():
            maps[mode] = model(tokens, attention_mask=mask, output_attentions=True).attentions
    heads = model.config.num_attention_heads
    for mode, attentions in maps.items():
        assert len(attentions) == model.config.num_hidden_layers
        for layer in attentions:
            assert layer.shape == (2, heads, 7, 7)
            assert torch.equal(layer.triu(1), torch.zeros_like(layer)), mode  # causal: nothing after the query
            assert torch.equal(layer[0, :, 2:, :2], torch.zeros(heads, 5, 2))  # real queries never see padding
            torch.testing.assert_close(layer[1].sum(-1), torch.ones(heads, 7))
    for simultaneous, sequential in zip(maps["simultaneous"], maps["sequential"]):
        torch.testing.assert_close(sequential[mask.bool()[:, None].expand(-1, heads, -1)],
                                   simultaneous[mask.bool()[:, None].expand(-1, heads, -1)], atol=1e-4, rtol=1e-4)


def test_mamba2_has_no_attention_maps():
    from conftest import tiny_mamba2

    with torch.no_grad():
        out = tiny_mamba2()(ids(), output_attentions=True, output_hidden_states=True)
    assert out.attentions is None and len(out.hidden_states) == 3


def test_hidden_states_follow_the_cache_in_sequential_steps(make_model):
    model = make_model()
    tokens = ids(length=6)
    with torch.no_grad():
        first = model(tokens[:, :4], use_cache=True, output_hidden_states=True)
        step = model(tokens[:, 4:5], cache=output_cache(first), use_cache=True, output_hidden_states=True,
                     output_attentions=True)
    assert all(h.shape == (2, 1, model.config.hidden_size) for h in step.hidden_states)
    if step.attentions is not None:  # Llama: the step's query over the 4 committed keys and its own
        assert all(a.shape == (2, model.config.num_attention_heads, 1, 5) for a in step.attentions)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    "settings", [dict(do_sample=False), dict(do_sample=True, top_k=4), dict(num_beams=2, do_sample=False)],
    ids=["greedy", "sampling", "beam"],
)
def test_generate_returns_dict_outputs(make_model, family, settings, use_cache):
    model = make_model()
    if family == "llama":  # attention maps come from eager attention: then asking for them changes no rounding
        model.set_attn_implementation("eager")
    tokens, mask = padded_ids(length=5)
    new_tokens = 3
    requested = dict(return_dict_in_generate=True, output_scores=True, output_logits=True,
                     output_hidden_states=True, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        torch.manual_seed(0)
        out = model.generate(tokens, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                             use_cache=use_cache, **settings, **requested)
        torch.manual_seed(0)
        plain = model.generate(tokens, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0,
                               use_cache=use_cache, **settings)
    rows = 2 * settings.get("num_beams", 1)
    assert torch.equal(out.sequences, plain)
    assert out.sequences.shape[1] == 5 + new_tokens
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == new_tokens
    assert all(s.shape == (rows, model.config.vocab_size) for s in out.scores)
    for step, per_layer in enumerate(out.hidden_states):
        assert len(per_layer) == model.config.num_hidden_layers + 1
        length = 5 + step if not use_cache else (5 if step == 0 else 1)  # without a cache every step rereads all
        assert all(h.shape == (rows, length, model.config.hidden_size) for h in per_layer)
    if family == "llama":
        assert len(out.attentions) == new_tokens and len(out.attentions[-1]) == model.config.num_hidden_layers
        keys = 5 + new_tokens - 1
        assert out.attentions[-1][0].shape[-1] == keys


def test_capabilities_are_declared():
    assert mi.ImplicitLlamaForCausalLM._supports_sdpa and mi.ImplicitLlamaModel._supports_sdpa
    assert mi.ImplicitLlamaForCausalLM._supports_flash_attn
    for model_class in (mi.ImplicitMamba2ForCausalLM, mi.ImplicitLlamaForCausalLM):
        assert model_class.supports_gradient_checkpointing
        assert model_class._no_split_modules


def test_device_map_auto_loads_on_the_cpu(tmp_path, make_model):
    pytest.importorskip("accelerate")
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)
