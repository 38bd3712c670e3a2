"""The pretraining data path: saved dataset folders read in memory, corpora streamed with 🤗 datasets (packing,
sharding across processes, epochs, exact resume from a checkpoint's position), and the offline corpus builder."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat

import pytest
import torch
from conftest import build_tokenizer, tiny_mamba2

datasets = pytest.importorskip("datasets")

WORDS = ["the", "implicit", "model", "iterates", "its", "layers", "to", "a", "fixed", "point", "mary", "went", "to", "the", "kitchen", "and", "john"]


def documents(count: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """Documents of 3 to 30 words, each starting with its number, so that rows show which document they came from."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(count):
        length = int(torch.randint(3, 30, (1,), generator=generator))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)]
        records.append({"id": f"doc-{index}", "text": f"{index} " + " ".join(words)})
    return records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as a saved DatasetDict folder, a JSON Lines file and a Parquet file."""
    root = tmp_path_factory.mktemp("data")
    records = documents()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "validation": datasets.Dataset.from_list(documents(5, seed=1))}).save_to_disk(
        str(root / "folder"))
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "shards").mkdir()  # the same documents as two shards, one compressed, in name order
    (root / "shards" / "00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:15]))
    with gzip.open(root / "shards" / "01.jsonl.gz", "wt") as shard:
        shard.write("".join(json.dumps(r) + "\n" for r in records[15:]))
    datasets.Dataset.from_list(records).to_parquet(str(root / "docs.parquet"))
    return root


def stream(path, batch_size=2, processes=1, rank=0, seq_len=8, shuffle=4, seed=0, split="train"):
    from implicit_lm.training.data import TextStream, streaming_documents

    return TextStream(streaming_documents(path, split, "text"), build_tokenizer(), seq_len, batch_size, seed,
                      vocab_size=300, shuffle_buffer=shuffle, num_processes=processes, rank=rank, source=str(path))


def test_folder_jsonl_and_parquet_stream_the_same_rows_as_the_in_memory_path(corpus):
    from implicit_lm.tokens import read_tokens

    tokenizer = build_tokenizer()
    packed = read_tokens(corpus / "folder", tokenizer, split="train")
    assert torch.equal(packed, read_tokens(corpus / "docs.jsonl", tokenizer))
    rows = packed[: packed.numel() // 8 * 8].view(-1, 8)
    for source in ("folder", "docs.jsonl", "docs.parquet", "shards"):
        streamed = torch.cat([stream(corpus / source, shuffle=0).batch(m) for m in range(rows.shape[0] // 2)])
        assert torch.equal(streamed, rows[: streamed.shape[0]]), source
    validation = read_tokens(corpus / "folder", tokenizer, split="validation")
    assert validation.numel() < packed.numel() / 4  # the other split


def test_streamed_epochs_visit_every_document_once_in_a_new_order(corpus):
    tokenizer = build_tokenizer()
    one = stream(corpus / "folder", seq_len=8, batch_size=1, shuffle=8)
    epochs: dict[int, list[int]] = {}
    micro = 0
    while len(epochs) < 3:
        row = one.batch(micro)
        epochs.setdefault(int(one.epoch_of(micro + 1)), []).extend(row.flatten().tolist())
        micro += 1

    def order(tokens):  # the documents' numbers, in the order read (an epoch starts with a fresh row)
        segments = tokenizer.decode(tokens).split(tokenizer.eos_token)
        return [int(segment.split()[0]) for segment in segments[:-1]]

    orders = [order(epochs[e]) for e in (0, 1)]
    for numbers in orders:
        assert len(set(numbers)) == len(numbers) >= 38  # each document once; the epoch's incomplete last row dropped
    assert orders[0] != orders[1]  # reshuffled
    assert orders[0] != sorted(orders[0])


def test_streamed_processes_split_the_same_global_stream(corpus):
    whole = stream(corpus / "folder", batch_size=4)
    shards = [stream(corpus / "folder", batch_size=2, processes=2, rank=rank) for rank in (0, 1)]
    for micro in range(30):  # past the end of the first epoch
        assert torch.equal(torch.cat([shard.batch(micro) for shard in shards]), whole.batch(micro)), micro


def test_streamed_position_resumes_bitwise_without_reading_the_past_again(corpus):
    reference = stream(corpus / "folder")
    expected = [reference.batch(m) for m in range(40)]
    for stop in (3, 17, 25):
        first = stream(corpus / "folder")
        for micro in range(stop):
            first.batch(micro)
        position = json.loads(json.dumps(first.position()))  # as a checkpoint stores it
        resumed = stream(corpus / "folder")
        resumed.seek(position)
        assert position["row"] == resumed.rows_before(stop)
        for micro in range(stop, 40):
            assert torch.equal(resumed.batch(micro), expected[micro]), (stop, micro)
    # Asked for an earlier batch, a stream reads again from the start and gives the same rows.
    assert torch.equal(reference.batch(2), expected[2])


def test_streaming_refuses_what_it_cannot_read(corpus, tmp_path):
    from implicit_lm.training.data import DataError, streaming_documents

    with pytest.raises(DataError, match="no split 'test'"):
        streaming_documents(corpus / "folder", "test", "text")
    with pytest.raises(DataError, match="no field 'body'"):
        streaming_documents(corpus / "docs.parquet", "train", "body")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="--streaming reads"):
        streaming_documents(tmp_path / "x.csv", "train", "text")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "mary went"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("mary went")
    with pytest.raises(DataError, match="mixes data files"):
        streaming_documents(tmp_path / "mixed", "train", "text")
    (tmp_path / "short.jsonl").write_text('{"text": "mary went"}\n')
    with pytest.raises(DataError, match="fewer than one row"):  # not an endless loop over a too-short corpus
        stream(tmp_path / "short.jsonl", seq_len=64).batch(0)


def test_finetune_streams_and_resumes_to_identical_weights(corpus, tmp_path):
    from implicit_lm.training.finetune import main
    from safetensors.torch import load_file

    tokenizer = build_tokenizer()
    tiny_mamba2(vocab_size=len(tokenizer), max_iterations=4, tolerance=0.05).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    def run(output, *extra):
        return main(["--model", str(tmp_path / "model"), "--data", str(corpus / "folder"), "--streaming",
                     "--shuffle-buffer", "8", "--eval-data", str(corpus / "folder"), "--eval-batches", "2",
                     "--seq-len", "8", "--batch-size", "2", "--max-steps", "6", "--save-every", "3",
                     "--learning-rate", "3e-3", "--output-dir", str(output), *extra])

    whole = run(tmp_path / "whole")
    state = json.loads((tmp_path / "whole" / "checkpoint-3" / "training_state.json").read_text())
    assert state["data_position"]["row"] == 3 * 2
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = run(tmp_path / "resumed", "--resume")
    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # A position that does not belong to the checkpoint's step is refused, not silently used.
    state["data_position"]["row"] = 4
    shutil.rmtree(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    (tmp_path / "resumed" / "checkpoint-3" / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit):
        run(tmp_path / "resumed", "--resume")


def test_document_rows_start_every_row_at_a_document(corpus):
    from implicit_lm.tokens import document_rows

    tokenizer = build_tokenizer()
    rows = document_rows(corpus / "folder", tokenizer, seq_len=12, max_sequences=None)
    texts = [r["text"] for r in documents()]
    long_enough = [t for t in texts if len(tokenizer(t)["input_ids"]) >= 12]
    assert rows.shape == (len(long_enough), 12)
    assert tokenizer.decode(rows[0]).startswith(long_enough[0][:4])


FAKE_BIBLE = """#!/bin/sh
cat <<'EOF'

Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

1 Samuel 2

  1 And Hannah prayed, and said,
EOF
"""


@pytest.fixture
def fake_bible(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "bible").write_text(FAKE_BIBLE)
    (folder / "bible").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder / "bible"


def test_kjv_chapters_become_documents(fake_bible):
    from implicit_lm.training.corpus import CorpusError, kjv_documents

    chapters = list(kjv_documents())
    assert [c["id"] for c in chapters] == ["kjv/Genesis 1", "kjv/1 Samuel 2"]
    assert chapters[0]["text"] == ("Genesis 1\n\nIn the beginning God created the heaven and the earth. "
                                   "And the earth was without form, and void.")
    fake_bible.write_text(FAKE_BIBLE.replace("1 Samuel 2", "Something else here:"))
    with pytest.raises(CorpusError, match="neither a chapter title nor a verse"):
        list(kjv_documents())


def test_corpus_build_splits_by_document_is_reproducible_and_never_overwrites(tmp_path, monkeypatch):
    from implicit_lm.training import corpus as corpus_module
    from transformers import AutoTokenizer

    texts = documents(120)
    monkeypatch.setitem(corpus_module.READERS, "kjv", lambda: iter(
        {"id": r["id"], "source": "kjv", "text": r["text"]} for r in texts))
    summary = corpus_module.build(tmp_path / "one", ["kjv"], vocab_size=300)
    corpus_module.build(tmp_path / "two", ["kjv"], vocab_size=300)
    built = datasets.load_from_disk(str(tmp_path / "one" / "dataset"))
    train_ids, validation_ids = set(built["train"]["id"]), set(built["validation"]["id"])
    assert train_ids.isdisjoint(validation_ids) and len(train_ids | validation_ids) == 120
    assert 0 < len(validation_ids) < 20
    assert summary["splits"]["validation"]["documents"] == len(validation_ids)
    assert summary["sources"][0]["license"].startswith("public domain")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "one" / "tokenizer")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.decode(tokenizer("mary went to the kitchen")["input_ids"]) == "mary went to the kitchen"
    for name in ("tokenizer/tokenizer.json", "corpus.json"):  # the same sources give the same corpus
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(corpus_module.CorpusError, match="exists"):
        corpus_module.build(tmp_path / "mine", ["kjv"], vocab_size=300)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "one", "two"]  # no staging left
