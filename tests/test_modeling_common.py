"""The contract every implicit model family honours, run for each (`make_model` is parametrized over the families):
modes and duality, the fixed-point cache, padding, generation, solver statistics, gradients and bad input."""

import math
import warnings

import pytest
import torch
from torch import nn

import modeling_implicit as mi
from modeling_implicit.compat import output_cache


def ids(batch=2, length=9, seed=0, vocab=64):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def fixed_point_function(backbone, tokens, cache=None):
    """The backbone's f(z) for `tokens` (no padding), after the tokens in `cache`, as the solver sees it."""
    return backbone.fixed_point_function(tokens, cache=cache)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_duality_simultaneous_and_sequential_agree(make_model, solver):
    model = make_model(solver=solver)
    tokens = ids()
    with torch.no_grad():
        simultaneous = model(tokens, use_cache=False)
        model.config.inference_mode = "sequential"
        sequential = model(tokens, use_cache=False)
    torch.testing.assert_close(sequential.logits, simultaneous.logits, atol=1e-4, rtol=1e-4)
    assert simultaneous.solver_stats.iterations.shape == (2,)
    assert sequential.solver_stats.iterations.shape == (2, 9)
    assert simultaneous.solver_stats.converged.all() and sequential.solver_stats.converged.all()


def test_token_by_token_with_cache_equals_sequential_forward(make_model):
    model = make_model(inference_mode="sequential")
    tokens = ids()
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache, streamed = None, []
        for t in range(tokens.shape[1]):
            out = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            streamed.append(out.logits)
    assert isinstance(cache, mi.ImplicitCache) and cache.get_seq_length() == tokens.shape[1]
    # The same solves; only kernels called on different shapes (rotary tables) may differ in the last bit.
    torch.testing.assert_close(torch.cat(streamed, 1), full, atol=2e-5, rtol=2e-5)


def test_iterations_never_write_the_committed_cache(make_model):
    model = make_model()
    with torch.no_grad():
        cache = output_cache(model(ids(length=5), use_cache=True))
        before = tuple(s.clone() for s in cache.states)
        fn = fixed_point_function(model.base_model, ids(length=1, seed=1), cache)
        for _ in range(3):
            fn(torch.randn(2, 1, model.config.hidden_size))
    assert cache.get_seq_length() == 5
    assert all(torch.equal(a, b) for a, b in zip(before, cache.states))


def test_cache_batch_operations(make_model):
    model = make_model()
    with torch.no_grad():
        cache = output_cache(model(ids(batch=3, length=5), use_cache=True))
    assert cache.batch_size == 3 and not cache.is_compileable
    original = tuple(s.clone() for s in cache.states)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert all(torch.equal(s[0], o[2]) for s, o in zip(cache.states, original))
    cache.batch_select_indices(torch.tensor([1]))
    assert all(torch.equal(s[0], o[0]) for s, o in zip(cache.states, original))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 2 and all(torch.equal(s[1], o[0]) for s, o in zip(cache.states, original))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.states is None


def test_batch_with_left_padding_equals_each_sequence_alone(make_model):
    model = make_model()
    long, short = ids(batch=1, length=7, seed=1), ids(batch=1, length=4, seed=2)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, use_cache=False)
        alone_long = model(long, use_cache=False)
        alone_short = model(short, use_cache=False)
        model.config.inference_mode = "sequential"
        batch_sequential = model(padded, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(batch.logits[0], alone_long.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.logits[1, 3:], alone_short.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_sequential[1, 3:], alone_short.logits[0], atol=1e-4, rtol=1e-4)
    # Padding is held at zero, so it changes neither the residual nor the iteration count of its sample.
    assert batch.solver_stats.iterations.tolist() == [
        alone_long.solver_stats.iterations.item(),
        alone_short.solver_stats.iterations.item(),
    ]

    generated = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[1, 7:], alone[0, 4:])


def test_a_batch_pays_for_its_rows_iterations_and_decodes_as_without_setting_rows_aside(make_model):
    model = make_model(tolerance=1e-5, eval_max_iterations=300)
    tokens = ids(batch=6, length=5, seed=4)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[4, :4] = 0
    runs = {}
    for skip in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mi.ConvergenceWarning)
            runs[skip] = model.generate(
                tokens, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, output_scores=True, solver_overrides=dict(skip_converged_rows=skip),
            )
        with torch.no_grad():
            runs[skip].stats = model(runs[skip].sequences, attention_mask=torch.cat(
                [mask, torch.ones(6, 5, dtype=mask.dtype)], 1), solver_overrides=dict(
                    skip_converged_rows=skip, inference_mode="sequential")).solver_stats
    # The same ids; logits within what the tolerance allows (a row's solve in another batch shape rounds otherwise).
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    shared, alone = runs[False].stats, runs[True].stats
    # Per token, the whole batch pays its slowest row's iterations for every row; set aside, each row pays its own.
    assert torch.equal(shared.evaluations, shared.iterations.max(0, keepdim=True).values.expand_as(shared.iterations))
    assert torch.equal(alone.evaluations, alone.iterations)
    assert alone.evaluations.float().mean() < 0.95 * shared.evaluations.float().mean()


@pytest.mark.parametrize("prefill_mode", ["simultaneous", "sequential"])
def test_greedy_generation_equals_recomputing_the_whole_sequence(make_model, prefill_mode):
    model = make_model(prefill_mode=prefill_mode)
    prompt = ids(batch=1, length=6)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
    assert torch.equal(out, sequence)


def test_beam_search_and_num_return_sequences_reorder_the_cache(make_model):
    model = make_model()
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


def test_solver_stats_and_non_convergence_warning(make_model):
    model = make_model(eval_max_iterations=3)
    with pytest.warns(mi.ConvergenceWarning, match="did not converge"), torch.no_grad():
        out = model(ids())
    assert out.solver_stats.iterations.tolist() == [3, 3]
    assert not out.solver_stats.converged.any()
    model.config.eval_max_iterations = 300
    with warnings.catch_warnings():
        warnings.simplefilter("error", mi.ConvergenceWarning)
        with torch.no_grad():
            assert model(ids()).solver_stats.converged.all()


def test_nan_weights_raise_instead_of_returning_garbage(make_model):
    model = make_model()
    output_projection = [m for m in model.base_model.layers[0].modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        output_projection.weight[0, 0] = float("nan")
    with pytest.raises(mi.SolverDivergenceError, match="NaN or infinite"), torch.no_grad():
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
    ],
)
def test_bad_input_raises_clear_errors(make_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model()(**kwargs)


def test_a_foreign_cache_is_rejected(make_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="(cache|past_key_values) must be the model.s own cache"):
        make_model()(ids(), past_key_values=DynamicCache())


def test_training_uses_phantom_gradients_that_approach_the_ift_gradient(make_model):
    """Phantom gradients (eq. 5, lambda = 1) converge to the implicit-function-theorem gradient as k grows, at the
    rate of the Jacobian's spectral radius."""
    model = make_model(
        num_hidden_layers=1, solver="picard", max_iterations=5000, tolerance=1e-11, phantom_damping=1.0
    ).double()
    model.train()
    tokens = ids(batch=1, length=4)
    weights = torch.randn(1, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    backbone = model.base_model
    params = [p for p in backbone.parameters() if p is not backbone.get_input_embeddings().weight]

    # Exact gradient: solve (I - J)^T v = dL/dz* at the fixed point, then v^T df/dtheta.
    with torch.no_grad():
        z_star = backbone(tokens, use_cache=False).last_hidden_state
    fn = fixed_point_function(backbone, tokens)
    jacobian = torch.autograd.functional.jacobian(lambda z: fn(z.view_as(z_star))[0].flatten(), z_star.flatten())
    v = torch.linalg.solve((torch.eye(jacobian.shape[0], dtype=torch.float64) - jacobian).T, weights.flatten())
    exact = torch.autograd.grad(fn(z_star)[0], params, grad_outputs=v.view_as(z_star))

    spectral_radius = torch.linalg.eigvals(jacobian).abs().max().item()
    assert spectral_radius < 1
    enough_steps = math.ceil(math.log(1e-8) / math.log(spectral_radius))
    errors = []
    for k in (1, 4, 16, enough_steps):
        model.config.phantom_steps = k
        out = backbone(tokens, use_cache=False).last_hidden_state
        grads = torch.autograd.grad((out * weights).sum(), params)
        num = sum((g - e).pow(2).sum() for g, e in zip(grads, exact)).sqrt()
        errors.append((num / sum(e.pow(2).sum() for e in exact).sqrt()).item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, (errors, spectral_radius)


def test_unrolled_backward_equals_autograd_through_the_loop(make_model):
    model = make_model(solver="picard", backward="unrolled", max_iterations=5, early_stop=False, damping=0.7)
    model = model.double().train()
    tokens = ids(batch=1, length=4)
    backbone = model.base_model
    params = list(backbone.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", mi.ConvergenceWarning)  # in training, hitting the cap is the recipe
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


def test_training_step_reduces_loss(make_model):
    model = make_model(max_iterations=8, tolerance=1e-3).train()
    tokens = ids(batch=4, length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mi.ConvergenceWarning)  # 8 iterations cannot reach 1e-3 early in training
        for _ in range(5):
            loss = model(tokens, labels=tokens).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert output_cache(model(tokens, labels=tokens)) is None
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("prefill_mode", ["simultaneous", "sequential"])
def test_multi_token_continuation_from_a_cache(make_model, prefill_mode):
    model = make_model(prefill_mode=prefill_mode)
    tokens = ids(length=10)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        first = model(tokens[:, :6], use_cache=True)
        rest = model(tokens[:, 6:], cache=output_cache(first), use_cache=True)
    assert output_cache(rest).get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-4, rtol=1e-4)


def test_bfloat16_forward_and_generation(make_model):
    model = make_model(tolerance=1e-2)
    tokens = ids()
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits
        model.to(torch.bfloat16)
        out = model(tokens, use_cache=True)
    assert out.logits.dtype == torch.float32
    assert output_cache(out).states[0].dtype == torch.bfloat16
    assert (out.logits - reference).abs().max() < 0.05
    assert model.generate(tokens, max_new_tokens=3, do_sample=False).shape == (2, 12)
