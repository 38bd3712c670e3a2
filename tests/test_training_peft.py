"""Fine-tuning: activation checkpointing (gradients unchanged, only recorded steps checkpointed, fewer saved bytes) and
PEFT LoRA (trains, saves and reloads the adapter, merges into a plain model that generates)."""

import warnings

import pytest
import torch

from modeling_implicit.modeling_implicit_utils import ConvergenceWarning, InputInjection

# The LoRA targets docs/ARCHITECTURE.md recommends: every Linear of the blocks. The injection is not an `nn.Linear`
# (its RMSNorm is inside), so LoRA cannot target it and "all-linear" leaves it out; `modules_to_save` adapts it.
LORA_TARGETS = {
    "mamba2": ["in_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


# A few Picard iterations: the gradients compared here need no convergence.
SOLVER = {"solver": "picard", "max_iterations": 8, "phantom_steps": 3}


def ids(batch=2, length=16, seed=0, vocab=64):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def enable_checkpointing(model, use_reentrant=False):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})


class SavedActivationBytes:
    """Bytes autograd saves for backward, counted once per storage, parameters excluded."""

    def __init__(self, model):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def loss_and_grads(model, tokens):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint warnings, on any call
        warnings.simplefilter("ignore", ConvergenceWarning)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backward", ["phantom", "unrolled"])
def test_checkpointing_leaves_gradients_unchanged(make_model, backward, use_reentrant):
    tokens = ids()
    expected_loss, expected = loss_and_grads(make_model(backward=backward, **SOLVER).double().train(), tokens)
    model = make_model(backward=backward, **SOLVER).double().train()
    enable_checkpointing(model, use_reentrant)
    loss, grads = loss_and_grads(model, tokens)
    assert model.is_activation_checkpointing
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    assert grads.keys() == expected.keys() and len(grads) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("backward", ["phantom", "unrolled"])
def test_only_recorded_evaluations_are_checkpointed(make_model, backward):
    """The tape-free solve runs under no_grad and is never checkpointed. Phantom: the `phantom_steps` evaluations
    are; unrolled: every solver iteration."""
    model = make_model(backward=backward, **SOLVER).train()
    calls = []

    def counting_checkpoint(function, *args):
        calls.append(torch.is_grad_enabled())
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    # What activation_checkpointing_enable() installs, with a counting checkpoint function.
    model._set_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    loss_and_grads(model, ids())
    evaluations = SOLVER["phantom_steps"] if backward == "phantom" else SOLVER["max_iterations"]
    assert len(calls) == evaluations * model.config.num_hidden_layers and all(calls)
    calls.clear()
    with torch.no_grad(), warnings.catch_warnings():  # grad mode off: training mode alone does not checkpoint
        warnings.simplefilter("ignore", ConvergenceWarning)
        model(ids())
    assert not calls


def test_gradient_checkpointing_enable_alias_and_disable(make_model):
    model = make_model().train()
    with pytest.warns(FutureWarning):  # transformers 5 deprecates the name in favour of activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.base_model.layers)
    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.base_model.layers)


@pytest.mark.parametrize("backward", ["phantom", "unrolled"])
def test_checkpointing_cuts_saved_activations(make_model, backward):
    """Checkpointed blocks keep only their inputs; what remains is outside the blocks (final norm, damping, loss)."""
    tokens = ids(length=32)
    saved = {}
    for checkpointing in (False, True):
        model = make_model(backward=backward, **SOLVER).train()
        if checkpointing:
            enable_checkpointing(model)
        with SavedActivationBytes(model) as counter:
            loss_and_grads(model, tokens)
        saved[checkpointing] = counter.total
    assert saved[True] < 0.5 * saved[False], saved


def get_lora_model(model, family, **overrides):
    peft = pytest.importorskip("peft")
    settings = {"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS[family], "task_type": "CAUSAL_LM", **overrides}
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`.
IGNORE_PEFT_DEPRECATION = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@IGNORE_PEFT_DEPRECATION
def test_lora_trains_saves_reloads_and_merges(tmp_path, family, make_model):
    peft = pytest.importorskip("peft")
    model = make_model()
    enable_checkpointing(model)
    adapted = get_lora_model(model, family)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    frozen_before = {name: p.clone() for name, p in adapted.named_parameters() if not p.requires_grad}

    tokens = ids(batch=2, length=12)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=2e-2)
    adapted.train()
    losses = []
    for _ in range(6):
        loss = adapted(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, frozen_before[name]) for name, p in adapted.named_parameters() if not p.requires_grad)

    adapted.eval()
    # Adapted and merged weights differ in rounding; a tight tolerance brings both solves to the same fixed point.
    model.config.tolerance = 1e-7
    prompt = tokens[:, :4]
    with torch.no_grad():
        logits = adapted(input_ids=tokens).logits
        generated = adapted.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    adapted.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(make_model(tolerance=1e-7), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, logits, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is type(model)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, logits, rtol=1e-5, atol=1e-5)
        merged_generated = merged.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert merged_generated.shape == (2, 8)
    torch.testing.assert_close(merged_generated, generated)


@IGNORE_PEFT_DEPRECATION
def test_lora_target_choice(family, make_model):
    """PEFT's "all-linear" selects exactly the recommended targets; the injection is refused as a LoRA target and is
    adapted (fully) through `modules_to_save`, which merges exactly."""
    peft = pytest.importorskip("peft")
    adapted = get_lora_model(make_model(), family, target_modules="all-linear")
    targeted = {name.rsplit(".", 2)[-2] for name, _ in adapted.named_modules() if name.endswith(".lora_A")}
    assert targeted == set(LORA_TARGETS[family])

    with pytest.raises(ValueError, match="InputInjection"):
        get_lora_model(make_model(), family, target_modules=["injection"])

    adapted = get_lora_model(make_model(), family, modules_to_save=["injection"])
    injection = adapted.get_base_model().base_model.injection
    assert isinstance(injection, peft.utils.ModulesToSaveWrapper)
    with torch.no_grad():
        for parameter in injection.modules_to_save["default"].parameters():
            parameter.mul_(1.1)
        tokens = ids()
        logits = adapted(input_ids=tokens).logits
        merged = adapted.merge_and_unload()
        assert isinstance(merged.base_model.injection, InputInjection)
        torch.testing.assert_close(merged(input_ids=tokens).logits, logits, rtol=1e-5, atol=1e-5)
