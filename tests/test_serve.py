"""`implicit-lm serve`: the OpenAI-compatible server, driven by the `openai` client over 127.0.0.1 on the bundled
English model (and a copy of it given a chat template)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from implicit_lm.serve import ModelServer, TextProgress, create_app

MODEL = ROOT / "models" / "implicit-mamba2-english"
NAME = "implicit-mamba2-english"
PROMPT = "In the beginning God"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


class InProcessServer:
    """uvicorn serving `create_app(server)` on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, server: ModelServer):
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=True)


@pytest.fixture(scope="module")
def served():
    model, tokenizer = load(MODEL)
    server = ModelServer(model, tokenizer, NAME, max_tokens_limit=64, max_solver_iterations=128)
    running = InProcessServer(server)
    yield running.client, model, tokenizer
    running.close()


def greedy(model, tokenizer, prompt_ids, max_new_tokens, **kwargs):
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def test_completion_is_generate_and_reports_its_iterations(served):
    client, model, tokenizer = served
    completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    choice = completion.choices[0]
    assert choice.text == greedy(model, tokenizer, prompt_ids, 12)
    assert choice.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(prompt_ids), 12)
    solver = completion.solver
    # one solve for the prompt (simultaneous prefill), one per token after the first
    assert solver["decode_steps"] == 11
    assert solver["iterations"] == solver["prompt_iterations"] + solver["decode_iterations"]
    assert solver["iterations_per_token"] == pytest.approx(solver["decode_iterations"] / 11)
    assert 1 < solver["iterations_per_token"] <= model.config.eval_max_iterations
    assert solver["settings"]["eval_max_iterations"] == model.config.eval_max_iterations


def test_solver_overrides_apply_to_one_request(served):
    client, model, tokenizer = served
    capped = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"solver_overrides": {"eval_max_iterations": 1}})
    assert capped.solver["max_iterations_per_solve"] == 1
    assert capped.solver["iterations"] == 8  # one iteration per solve: the prompt's and 7 tokens'
    assert capped.solver["settings"]["eval_max_iterations"] == 1
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert capped.choices[0].text == greedy(model, tokenizer, prompt_ids, 8,
                                            solver_overrides={"eval_max_iterations": 1})
    # more test-time compute on request: a tighter tolerance takes more iterations per token
    tight = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"solver_overrides": {"tolerance": 1e-4}})
    default = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert tight.solver["iterations_per_token"] > default.solver["iterations_per_token"]
    assert default.solver["settings"]["tolerance"] == model.config.tolerance  # the model's config is untouched


def test_streaming_sends_the_same_text_and_ends_with_the_solver_work(served):
    client, _, _ = served
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].text]) > 3  # token by token
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.solver["iterations"] == whole.solver["iterations"]
    assert usage.choices == [] and usage.usage.completion_tokens == 12


def test_concurrent_requests_are_both_answered(served):
    client, _, _ = served
    expected = {n: client.completions.create(model=NAME, prompt=PROMPT, max_tokens=n, temperature=0).choices[0].text
                for n in (10, 14)}

    def streamed(n):
        return "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=n, temperature=0, stream=True) if chunk.choices)

    def whole(n):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(streamed, 10), pool.submit(whole, 14)
        assert (first.result(60), second.result(60)) == (expected[10], expected[14])


def test_stop_strings_end_the_text_before_them(served):
    client, _, _ = served
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = free.split()[3]  # a word the free generation reaches
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop], stream=True) if chunk.choices)
    assert streamed == cut.choices[0].text


@pytest.mark.parametrize(("extra", "named"), [
    ({"solver_overrides": {"eval_max_iterations": 0}}, "eval_max_iterations"),
    ({"solver_overrides": {"num_hidden_layers": 2}}, "num_hidden_layers"),
    ({"solver_overrides": {"eval_max_iterations": 1000}}, "eval_max_iterations"),  # above the server's limit
    ({"solver_overrides": "fast"}, "solver_overrides"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"logprobs": 2}, "logprobs"),
])
def test_bad_requests_are_refused_naming_the_field(served, extra, named):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=NAME, prompt=PROMPT, extra_body=extra)
    assert named in refused.value.body["message"]


def test_chat_needs_a_chat_template_and_other_models_are_not_found(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Who made the light?"}])
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert [model.id for model in client.models.list()] == [NAME]


def test_chat_completions_with_a_chat_template(tmp_path):
    folder = tmp_path / "with-template"
    shutil.copytree(MODEL, folder)  # follows the remote code's symlinks
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    model, tokenizer = load(folder)
    running = InProcessServer(ModelServer(model, tokenizer, "chat", max_tokens_limit=64, max_solver_iterations=128))
    try:
        messages = [{"role": "system", "content": "Scripture."}, {"role": "user", "content": "In the beginning"}]
        reply = running.client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert reply.choices[0].message.content == greedy(model, tokenizer, prompt_ids, 10)
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.prompt_tokens == len(prompt_ids) and reply.solver["decode_steps"] == 9
        chunks = list(running.client.chat.completions.create(
            model="chat", messages=messages, max_tokens=10, temperature=0, stream=True,
            extra_body={"solver_overrides": {"eval_max_iterations": 2}}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].solver["max_iterations_per_solve"] <= 2
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        running.close()


def test_sampling_with_a_seed_repeats_and_n_gives_several_choices(served):
    client, _, _ = served
    first, again = (client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
                    for _ in range(2))
    assert first.choices[0].text == again.choices[0].text
    several = client.completions.create(model=NAME, prompt=[PROMPT, "And God said"], max_tokens=6, temperature=0,
                                        n=2)
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text != several.choices[2].text
    assert several.usage.completion_tokens == 24
    assert several.solver["decode_steps"] == 20  # the sums over the four generations


def test_an_explicit_model_is_served_without_a_solver():
    model, tokenizer = load(ROOT / "models" / "mamba2-english")
    running = InProcessServer(ModelServer(model, tokenizer, "explicit", max_tokens_limit=64,
                                          max_solver_iterations=128))
    try:
        completion = running.client.completions.create(model="explicit", prompt=PROMPT, max_tokens=5, temperature=0)
        assert completion.usage.completion_tokens == 5 and completion.solver is None
        with pytest.raises(openai.BadRequestError, match="not an implicit model"):
            running.client.completions.create(model="explicit", prompt=PROMPT,
                                              extra_body={"solver_overrides": {"tolerance": 1e-3}})
    finally:
        running.close()


def test_text_progress_never_takes_back_a_streamed_delta():
    class Characters:  # a tokenizer whose tokens are characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    text = "and it was good. And God saw"
    progress = TextProgress(Characters(), stop=[". And"])
    sent = "".join(progress.update([ord(c) for c in text[:end]]) for end in range(1, len(text) + 1))
    assert sent == "and it was good" and progress.stopped
    assert progress.update([ord(c) for c in text], final=True) == ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_serve_command(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "implicit_lm.serve", str(MODEL), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert [model.id for model in models] == [NAME]
        completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
        assert completion.usage.completion_tokens == 4 and completion.solver["iterations"] > 0
    finally:
        process.terminate()
        process.wait(30)


def test_the_serve_command_refuses_a_folder_without_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "implicit_lm.serve", str(tmp_path / "missing")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
