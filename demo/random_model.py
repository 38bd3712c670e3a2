"""A freshly initialised implicit Mamba2 (or, with `--family llama`, implicit Llama) end to end through transformers.

`implicit-lm demo-random` builds a small implicit model with RANDOM weights and a byte-level tokenizer, saves
them as a Hub-layout folder (config with auto_map, safetensors, remote code, tokenizer), reloads the folder with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, checks that the simultaneous and sequential
modes agree, and generates with `pipeline("text-generation")`, reporting how many solver iterations each generated
token took. The text is noise (the weights are untrained); the folder is a byte-level model any eval command can
read (docs/EVALUATION.md). The main job, `implicit-lm demo`, runs the trained bundled models instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import modeling_implicit as mi

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: outputs/ goes there


def byte_level_tokenizer():
    """A tokenizer over the 256 bytes plus <pad>, <s>, </s>: covers any text, needs no training or download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def build_random_model(
    tokenizer, args: argparse.Namespace
) -> mi.ImplicitMamba2ForCausalLM | mi.ImplicitLlamaForCausalLM:
    torch.manual_seed(args.seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        solver=args.solver,
        tolerance=args.tolerance,
        eval_max_iterations=args.max_iterations,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if args.family == "llama":
        config = mi.ImplicitLlamaConfig(
            intermediate_size=2 * args.hidden_size, num_attention_heads=4, num_key_value_heads=2, **common
        )
        return mi.ImplicitLlamaForCausalLM(config)
    config = mi.ImplicitMamba2Config(state_size=16, head_dim=16, chunk_size=64, **common)
    return mi.ImplicitMamba2ForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="implicit-lm demo-random", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", default="Implicit language models are")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--family", choices=["mamba2", "llama"], default="mamba2")
    parser.add_argument("--output-dir", type=Path, help="defaults to outputs/demo-implicit-<family>")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--solver", choices=["picard", "anderson"], default="anderson")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--max-iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.output_dir is None:
        args.output_dir = ROOT / "outputs" / f"demo-implicit-{args.family}"

    from transformers import AutoModelForCausalLM, pipeline

    print("NOTE: this model has RANDOM weights, so its text is noise (implicit-lm demo runs the trained models).")
    tokenizer = byte_level_tokenizer()
    model = build_random_model(tokenizer, args)
    model.generation_config.max_new_tokens = args.max_new_tokens
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Saved a {n_params / 1e3:.0f}K-parameter {type(model).__name__} with remote code to {args.output_dir}")

    loaded = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    print(f"Reloaded with AutoModelForCausalLM(trust_remote_code=True): {type(loaded).__name__}")

    tokens = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        simultaneous = loaded(tokens, use_cache=False, solver_overrides={"inference_mode": "simultaneous"})
        sequential = loaded(tokens, use_cache=False, solver_overrides={"inference_mode": "sequential"})
    gap = (simultaneous.logits - sequential.logits).abs().max().item()
    print(
        f"Duality on the prompt ({tokens.shape[1]} tokens): max |logit difference| simultaneous vs sequential = "
        f"{gap:.2e}; simultaneous solve took {simultaneous.solver_stats.iterations.item()} iterations, "
        f"sequential mean {sequential.solver_stats.iterations.float().mean().item():.1f} per token"
    )

    per_token_iterations: list[int] = []

    def record(module, inputs, output):
        if output.solver_stats is not None and output.solver_stats.iterations.dim() == 2:
            per_token_iterations.extend(output.solver_stats.iterations.flatten().tolist())

    hook = loaded.base_model.register_forward_hook(record)
    generator = pipeline("text-generation", model=loaded, tokenizer=tokenizer, device="cpu")
    start = time.perf_counter()
    text = generator(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False)[0]["generated_text"]
    elapsed = time.perf_counter() - start
    hook.remove()
    print(f"Generated (greedy, {args.max_new_tokens} new tokens, {args.max_new_tokens / elapsed:.1f} tokens/s):")
    print(repr(text))
    if per_token_iterations:
        mean = sum(per_token_iterations) / len(per_token_iterations)
        print(f"Solver iterations per decoded token: mean {mean:.1f}, max {max(per_token_iterations)}")


if __name__ == "__main__":
    main()
