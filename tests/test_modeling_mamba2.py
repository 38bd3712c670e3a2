"""Implicit Mamba2 as a transformers model: math, modes, cache, generation, gradients, bad input."""

import warnings

import pytest
import torch
from conftest import tiny_mamba2, tiny_mamba2_config

import modeling_implicit as mi


def ids(batch=2, length=9, seed=0, vocab=64):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_explicit_model_reproduces_transformers_mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = tiny_mamba2_config(implicit=False, chunk_size=4)
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
        cache = sequential.past_key_values
        for t in range(5, 11):
            step = ours(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            streamed.append(step.logits)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(streamed, 1), expected, atol=1e-5, rtol=1e-5)
    assert ours(tokens).solver_stats is None


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_duality_simultaneous_and_sequential_agree(solver):
    model = tiny_mamba2(solver=solver)
    tokens = ids()
    with torch.no_grad():
        simultaneous = model(tokens, use_cache=False)
        model.config.inference_mode = "sequential"
        sequential = model(tokens, use_cache=False)
    torch.testing.assert_close(sequential.logits, simultaneous.logits, atol=1e-4, rtol=1e-4)
    assert simultaneous.solver_stats.iterations.shape == (2,)
    assert sequential.solver_stats.iterations.shape == (2, 9)
    assert simultaneous.solver_stats.converged.all() and sequential.solver_stats.converged.all()


def test_token_by_token_with_cache_equals_sequential_forward():
    model = tiny_mamba2(inference_mode="sequential")
    tokens = ids()
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache, streamed = None, []
        for t in range(tokens.shape[1]):
            out = model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            streamed.append(out.logits)
    assert isinstance(cache, mi.ImplicitMamba2Cache) and cache.get_seq_length() == tokens.shape[1]
    torch.testing.assert_close(torch.cat(streamed, 1), full, atol=1e-6, rtol=1e-6)


def test_iterations_never_write_the_committed_cache():
    model = tiny_mamba2()
    with torch.no_grad():
        cache = model(ids(length=5), use_cache=True).past_key_values
        before = tuple(s.clone() for s in cache.states)
        fn = model.backbone._fixed_point_function(None, None, cache, return_states=True)
        fn(torch.randn(2, 1, 32))
    assert all(torch.equal(a, b) for a, b in zip(before, cache.states))


def test_cache_layout_and_batch_operations():
    model = tiny_mamba2()
    config = model.config
    with torch.no_grad():
        cache = model(ids(batch=3, length=5), use_cache=True).past_key_values
    conv, ssm = cache.states
    assert conv.shape == (3, config.num_hidden_layers, config.conv_dim, config.conv_kernel - 1)
    assert ssm.shape == (3, config.num_hidden_layers, config.num_heads, config.head_dim, config.state_size)
    assert cache.batch_size == 3 and not cache.is_compileable and not cache.is_croppable
    original = tuple(s.clone() for s in cache.states)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.states[1][0], original[1][2])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.states[1][0], original[1][0])
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 2 and torch.equal(cache.states[0][1], original[0][0])
    with pytest.raises(NotImplementedError):
        cache.crop(1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.states is None


def test_batch_with_left_padding_equals_each_sequence_alone():
    model = tiny_mamba2()
    long, short = ids(batch=1, length=7, seed=1), ids(batch=1, length=4, seed=2)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, use_cache=False).logits
        alone_long = model(long, use_cache=False).logits
        alone_short = model(short, use_cache=False).logits
        model.config.inference_mode = "sequential"
        batch_sequential = model(padded, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(batch[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1, 3:], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_sequential[1, 3:], alone_short[0], atol=1e-4, rtol=1e-4)

    generated = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[1, 7:], alone[0, 4:])


@pytest.mark.parametrize("prefill_mode", ["simultaneous", "sequential"])
def test_greedy_generation_equals_recomputing_the_whole_sequence(prefill_mode):
    model = tiny_mamba2(prefill_mode=prefill_mode)
    prompt = ids(batch=1, length=6)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
    assert torch.equal(out, sequence)


def test_beam_search_and_num_return_sequences_reorder_the_cache():
    model = tiny_mamba2()
    model.generation_config.eos_token_id = None  # every beam runs the full length
    prompt = ids(batch=2, length=5)
    beams = model.generate(
        prompt, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, return_dict_in_generate=True,
        output_scores=True, length_penalty=0.0,
    )
    assert beams.sequences.shape == (4, 10)
    # Each returned beam's score must equal the log-probability of its tokens under a fresh full forward,
    # which only holds if the cache followed the beams through every reorder.
    with torch.no_grad():
        logits = model(beams.sequences, use_cache=False).logits.log_softmax(-1)
    token_logprobs = logits[:, 4:-1].gather(-1, beams.sequences[:, 5:, None])[..., 0].sum(-1)
    torch.testing.assert_close(beams.sequences_scores, token_logprobs, atol=1e-4, rtol=1e-4)
    sampled = model.generate(prompt, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 9)


def test_solver_stats_and_non_convergence_warning():
    model = tiny_mamba2(eval_max_iterations=3)
    with pytest.warns(mi.ConvergenceWarning, match="did not converge"):
        with torch.no_grad():
            out = model(ids())
    assert out.solver_stats.iterations.tolist() == [3, 3]
    assert not out.solver_stats.converged.any()
    model.config.eval_max_iterations = 300
    with warnings.catch_warnings():
        warnings.simplefilter("error", mi.ConvergenceWarning)
        with torch.no_grad():
            assert model(ids()).solver_stats.converged.all()


def test_nan_weights_raise_instead_of_returning_garbage():
    model = tiny_mamba2()
    with torch.no_grad():
        model.backbone.layers[0].mixer.out_proj.weight[0, 0] = float("nan")
    with pytest.raises(mi.SolverDivergenceError, match="NaN or infinite"):
        with torch.no_grad():
            model(ids())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[3, 64]])), r"\[0, 64\)"),
        (dict(input_ids=torch.tensor([[-1, 3]])), r"\[0, 64\)"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "Empty input"),
        (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), "Empty input"),
        (dict(), "exactly one"),
        (dict(input_ids=torch.tensor([[3, 4]]), attention_mask=torch.ones(1, 5)), "attention_mask"),
        (dict(input_ids=torch.tensor([[3, 4]]), output_hidden_states=True), "hidden states"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_mamba2()(**kwargs)


def fixed_point_function(backbone, tokens):
    """The backbone's f(z) for `tokens` (no padding, no cache), as the solver sees it."""
    injection = backbone.injection(backbone.embeddings(tokens))
    return backbone._fixed_point_function(injection, None, None, return_states=False)


def test_training_uses_phantom_gradients_that_approach_the_ift_gradient():
    """Phantom gradients (eq. 5, lambda = 1) converge to the implicit-function-theorem gradient as k grows."""
    model = tiny_mamba2(num_hidden_layers=1, max_iterations=400, tolerance=1e-11, phantom_damping=1.0).double()
    model.train()
    tokens = ids(batch=1, length=4)
    weights = torch.randn(1, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    backbone = model.backbone
    params = [p for n, p in backbone.named_parameters() if "embeddings" not in n]

    # Exact gradient: solve (I - J)^T v = dL/dz* at the fixed point, then v^T df/dtheta.
    with torch.no_grad():
        z_star = backbone(tokens, use_cache=False).last_hidden_state
    fn = fixed_point_function(backbone, tokens)
    jacobian = torch.autograd.functional.jacobian(lambda z: fn(z.view_as(z_star))[0].flatten(), z_star.flatten())
    v = torch.linalg.solve((torch.eye(jacobian.shape[0], dtype=torch.float64) - jacobian).T, weights.flatten())
    exact = torch.autograd.grad(fn(z_star)[0], params, grad_outputs=v.view_as(z_star))

    errors = []
    for k in (1, 4, 16, 64):
        model.config.phantom_steps = k
        out = backbone(tokens, use_cache=False).last_hidden_state
        grads = torch.autograd.grad((out * weights).sum(), params)
        num = sum((g - e).pow(2).sum() for g, e in zip(grads, exact)).sqrt()
        errors.append((num / sum(e.pow(2).sum() for e in exact).sqrt()).item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors


def test_unrolled_backward_equals_autograd_through_the_loop():
    model = tiny_mamba2(backward="unrolled", max_iterations=5, tolerance=1e-30, damping=0.7).double().train()
    tokens = ids(batch=1, length=4)
    backbone = model.backbone
    params = list(backbone.parameters())
    with pytest.warns(mi.ConvergenceWarning):
        out = backbone(tokens, use_cache=False).last_hidden_state
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)

    fn = fixed_point_function(backbone, tokens)
    z = torch.zeros_like(out)
    for step in range(5):
        fz = fn(z)[0]
        z = 0.3 * z + 0.7 * fz if step < 4 else fz
    expected = torch.autograd.grad(z.sum(), params, allow_unused=True)
    torch.testing.assert_close(out, z)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_training_step_reduces_loss():
    model = tiny_mamba2(max_iterations=8, tolerance=1e-3).train()
    tokens = ids(batch=4, length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mi.ConvergenceWarning)
            loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model(tokens, labels=tokens).past_key_values is None


@pytest.mark.parametrize("prefill_mode", ["simultaneous", "sequential"])
def test_multi_token_continuation_from_a_cache(prefill_mode):
    model = tiny_mamba2(prefill_mode=prefill_mode)
    tokens = ids(length=10)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        first = model(tokens[:, :6], use_cache=True)
        rest = model(tokens[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert rest.past_key_values.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-4, rtol=1e-4)


def test_bfloat16_forward_and_generation():
    model = tiny_mamba2(tolerance=1e-2)
    tokens = ids()
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits
        model.to(torch.bfloat16)
        out = model(tokens, use_cache=True)
    conv, ssm = out.past_key_values.states
    assert conv.dtype == torch.bfloat16 and ssm.dtype == torch.float32
    assert out.logits.dtype == torch.float32
    assert (out.logits - reference).abs().max() < 0.05
    assert model.generate(tokens, max_new_tokens=3, do_sample=False).shape == (2, 12)
