"""Implicit Mamba2 specifics: equivalence with transformers' Mamba2 and the recurrent cache layout (the shared
contract is in test_modeling_common.py)."""

import pytest
import torch
from conftest import tiny_llama, tiny_mamba2, tiny_mamba2_config
from test_modeling_common import ids

import modeling_implicit as mi
from modeling_implicit.compat import output_cache


@pytest.mark.parametrize("n_groups", [1, 2])
def test_explicit_model_reproduces_transformers_mamba2(n_groups):
    import transformers
    from packaging.version import Version
    from transformers import Mamba2Config, Mamba2ForCausalLM

    if n_groups > 1 and Version(transformers.__version__) < Version("5.23"):
        # Measured: 5.10.1, 5.12.0 and 5.17.0 assign heads to B/C groups differently from mamba (and from 5.23 on).
        pytest.skip("transformers' pure-PyTorch Mamba2 before 5.23 mis-assigns heads to groups when n_groups > 1")
    config = tiny_mamba2_config(implicit=False, chunk_size=4, n_groups=n_groups)
    reference_config = Mamba2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        state_size=config.state_size, head_dim=config.head_dim, num_heads=config.num_heads, expand=config.expand,
        n_groups=config.n_groups, conv_kernel=config.conv_kernel, chunk_size=config.chunk_size,
        layer_norm_epsilon=config.layer_norm_epsilon, residual_in_fp32=True, tie_word_embeddings=True,
        use_bias=False, use_conv_bias=True,
    )
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(reference_config).eval()
    with torch.no_grad():  # non-trivial norms and D so every weight matters
        for name, param in reference.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                param.uniform_(0.5, 1.5)
    ours = mi.ImplicitMamba2ForCausalLM(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = ids(length=11)
    with torch.no_grad():
        expected = reference(tokens, use_cache=False).logits
        got = ours(tokens, use_cache=False).logits
        sequential = ours(tokens[:, :5], use_cache=True)
        streamed = [sequential.logits]
        cache = output_cache(sequential)
        for t in range(5, 11):
            step = ours(tokens[:, t : t + 1], cache=cache, use_cache=True)
            streamed.append(step.logits)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(streamed, 1), expected, atol=1e-5, rtol=1e-5)
    assert ours(tokens).solver_stats is None


def test_cache_layout():
    model = tiny_mamba2(tolerance=1e-2)
    config = model.config
    with torch.no_grad():
        cache = output_cache(model(ids(batch=3, length=5), use_cache=True))
    assert isinstance(cache, mi.ImplicitMamba2Cache)
    conv, ssm = cache.states
    assert conv.shape == (3, config.num_hidden_layers, config.conv_dim, config.conv_kernel - 1)
    assert ssm.shape == (3, config.num_hidden_layers, config.num_heads, config.head_dim, config.state_size)
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(-1)
    model.to(torch.bfloat16)
    with torch.no_grad():
        conv, ssm = output_cache(model(ids(), use_cache=True)).states
    assert conv.dtype == torch.bfloat16 and ssm.dtype == torch.float32


def test_noise_study_acts_on_sequential_steps_only_and_repeats_with_a_seed():
    import warnings

    model = tiny_mamba2(inference_mode="sequential", latent_noise_db=30.0, state_noise_db=30.0, tolerance=1e-3,
                        eval_max_iterations=40)
    clean = tiny_mamba2(inference_mode="sequential", tolerance=1e-3, eval_max_iterations=40)
    tokens = ids(batch=2, length=6)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)  # noise at every iteration: no exact fixed point
        first, second = (model(tokens, attention_mask=mask, noise_generator=torch.Generator().manual_seed(3)).logits
                         for _ in range(2))
        other = model(tokens, attention_mask=mask, noise_generator=torch.Generator().manual_seed(4)).logits
        expected = clean(tokens, attention_mask=mask).logits
        simultaneous = model(tokens, attention_mask=mask, noise_generator=torch.Generator().manual_seed(3),
                             cache=None, use_cache=False)
        model.config.inference_mode = "simultaneous"
        full_sequence = model(tokens, attention_mask=mask).logits
        clean.config.inference_mode = "simultaneous"
        full_clean = clean(tokens, attention_mask=mask).logits
    assert torch.equal(first, second) and not torch.equal(first, other)
    torch.testing.assert_close(first[1, 0], expected[1, 0])  # the first token is no step: no noise
    assert (first[1, 1:] - expected[1, 1:]).abs().max() > 1e-4
    torch.testing.assert_close(first[0, 3], expected[0, 3])  # the first real token after padding: no noise yet
    assert simultaneous.logits.shape == first.shape
    torch.testing.assert_close(full_sequence, full_clean)  # simultaneous mode takes no single-token step
    with pytest.raises(ValueError, match="noise_mode='loud'"):
        tiny_mamba2(noise_mode="loud")


def test_generate_takes_the_noise_generator_and_other_families_refuse_it():
    """generate() hands `noise_generator` to every decoding step (one seeded generator repeats a noisy generation);
    the argument is Mamba2's alone, so a Llama's generate() refuses it as it refuses any unknown argument."""
    import warnings

    model = tiny_mamba2(latent_noise_db=10.0, state_noise_db=10.0, tolerance=1e-3, eval_max_iterations=20)
    prompt = ids(batch=1, length=3)
    settings = dict(max_new_tokens=12, do_sample=True, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)
        runs = []
        for seed in (7, 7, 8, 9):
            torch.manual_seed(0)  # the same sampling draws: only the noise's generator differs
            runs.append(model.generate(prompt, noise_generator=torch.Generator().manual_seed(seed), **settings))
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], run) for run in runs[2:])
    with pytest.raises(ValueError, match="noise_generator"):
        tiny_llama().generate(prompt, max_new_tokens=2, noise_generator=torch.Generator(), pad_token_id=0)
