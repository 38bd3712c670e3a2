import pytest
import torch

from modeling_implicit.mamba2_ops import causal_conv1d_silu, gated_rms_norm, ssd_chunk_scan, ssd_step


@pytest.mark.parametrize("length, chunk_size, groups", [(13, 4, 2), (8, 8, 1), (5, 16, 4), (1, 4, 1)])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunk_scan_matches_token_recurrence(length, chunk_size, groups, with_initial_state):
    torch.manual_seed(0)
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, length, h, p)
    dt = torch.rand(b, length, h)
    A = -torch.rand(h) * 3
    B, C = torch.randn(b, length, groups, n), torch.randn(b, length, groups, n)
    D = torch.randn(h)
    state = torch.randn(b, h, p, n) if with_initial_state else torch.zeros(b, h, p, n)
    y, final = ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=state if with_initial_state else None)
    outputs = []
    for t in range(length):
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        outputs.append(y_t)
    torch.testing.assert_close(y, torch.stack(outputs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)


def test_zero_time_step_leaves_state_untouched():
    torch.manual_seed(0)
    state = torch.randn(1, 2, 3, 4)
    y, new_state = ssd_step(
        torch.randn(1, 2, 3), torch.zeros(1, 2), -torch.ones(2), torch.randn(1, 1, 4), torch.randn(1, 1, 4),
        torch.zeros(2), state,
    )
    torch.testing.assert_close(new_state, state)


def test_steps_do_not_modify_their_inputs():
    state = torch.randn(1, 2, 3, 4)
    before = state.clone()
    ssd_step(torch.randn(1, 2, 3), torch.rand(1, 2), -torch.ones(2), torch.randn(1, 1, 4), torch.randn(1, 1, 4),
             torch.ones(2), state)
    conv_state = torch.randn(1, 6, 3)
    conv_before = conv_state.clone()
    causal_conv1d_silu(torch.randn(1, 6, 1), torch.randn(6, 4), None, conv_state)
    assert torch.equal(state, before) and torch.equal(conv_state, conv_before)


def test_conv_matches_torch_conv_and_streams():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6)
    out, state = causal_conv1d_silu(x, weight, bias, None)
    reference = torch.nn.functional.conv1d(x, weight[:, None], bias, padding=3, groups=6)[..., :9]
    torch.testing.assert_close(out, torch.nn.functional.silu(reference))
    streamed, running = [], None
    for t in range(9):
        o, running = causal_conv1d_silu(x[..., t : t + 1], weight, bias, running)
        streamed.append(o)
    torch.testing.assert_close(torch.cat(streamed, -1), out)
    torch.testing.assert_close(running, state)


def test_gated_norm_matches_transformers():
    from transformers.models.mamba2 import modeling_mamba2

    # transformers 5.25 renamed MambaRMSNormGated to Mamba2RMSNormGated; the maths is the same.
    gated_norm_class = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    torch.manual_seed(0)
    reference = gated_norm_class(16, group_size=8, eps=1e-5)
    reference.weight.data.normal_()
    x, gate = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(gated_rms_norm(x, gate, reference.weight, 1e-5, 8), reference(x, gate))


def test_gaussian_noise_follows_the_forks_snr_definition():
    from modeling_implicit.mamba2_ops import gaussian_noise

    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(0)) * 3
    assert gaussian_noise(x, 0.0, "additive") is x and gaussian_noise(x, -5.0, "multiplicative") is x  # 0 dB: off
    noisy = gaussian_noise(x, 20.0, "additive", torch.Generator().manual_seed(1))
    ratio = x.pow(2).mean() / (noisy - x).pow(2).mean()
    assert abs(10 * torch.log10(ratio).item() - 20.0) < 0.2  # the measured SNR is the one asked for
    relative = gaussian_noise(x, 20.0, "multiplicative", torch.Generator().manual_seed(1)) / x - 1
    assert abs(relative.std().item() - 0.1) < 0.005  # sigma = 10 ** (-20 / 20), whatever the signal power
    again = gaussian_noise(x, 20.0, "additive", torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    rows = torch.tensor([1, 0, 1, 0])
    masked = gaussian_noise(x, 20.0, "additive", torch.Generator().manual_seed(1), rows=rows)
    assert torch.equal(masked[1], x[1]) and torch.equal(masked[3], x[3]) and not torch.equal(masked[0], x[0])
