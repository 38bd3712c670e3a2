"""An English corpus that any fresh machine can rebuild offline, and the byte-level BPE tokenizer trained on it.

Sources (Debian packages, installed with `apt-get install bible-kjv python3.11-doc`):
- `kjv`: the King James Bible (public domain), printed by the `bible` program of `bible-kjv`; one document per
  chapter (1,189), its verses joined into one paragraph under the chapter's title.
- `python-docs`: the reStructuredText sources of Python's documentation (`python3.X-doc`,
  `/usr/share/doc/python3.X/html/_sources/**/*.rst.txt`; the PSF License), one document per file.

`build` writes `DIR/dataset` (a 🤗 `datasets` DatasetDict saved with `save_to_disk`: `train` and `validation`, split by
document with a hash of its id, never by line; columns `text`, `source`, `id`), `DIR/tokenizer` (a transformers
tokenizer: byte-level BPE trained with `tokenizers` on the training split, with `<s>`, `</s>` and `<pad>`), and
`DIR/corpus.json` (sources, licenses, package versions, documents, characters and tokens per split, and a SHA-256 of
the text). The same packages give the same corpus and tokenizer.

    implicit-lm corpus --output-dir runs/corpus [--vocab-size 8192] [--sources kjv,python-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from implicit_lm.cli import InputError, run_cli
from implicit_lm.files import atomic_output, write_json

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VALIDATION_SHARE = 0.05  # of the documents, chosen by a hash of their id
# The whole Bible, Genesis 1:1 to Revelation 22:21, in the `bible` program's verse syntax.
KJV_RANGE = "Ge1:1-Re22:21"
CHAPTER_TITLE = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]* \d+$")
VERSE = re.compile(r"^\s+\d+ (.*)$")


class CorpusError(InputError):
    """A source that is missing or does not read as expected."""


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    license: str
    description: str


SOURCES = {
    "kjv": Source("kjv", "bible-kjv", "public domain (the 1611 translation; Debian's bible-kjv-text)",
                  "the King James Bible, one document per chapter"),
    "python-docs": Source("python-docs", "python3.11-doc", "PSF License Version 2 (Python's documentation)",
                          "the reStructuredText sources of Python's documentation, one document per file"),
}


def kjv_documents() -> Iterator[dict[str, str]]:
    """The chapters of the King James Bible as documents: `Genesis 1\\n\\nIn the beginning ... waters. ...`."""
    if shutil.which("bible") is None:
        raise CorpusError("the `bible` program is missing: install Debian's bible-kjv (apt-get install bible-kjv)")
    output = subprocess.run(["bible", "-l0", KJV_RANGE], capture_output=True, text=True, check=True).stdout
    title, verses = None, []
    for line in output.splitlines():
        if not line.strip():
            continue
        verse = VERSE.match(line)
        if verse:
            if title is None:
                raise CorpusError(f"`bible` printed a verse before any chapter title: {line[:60]!r}")
            verses.append(verse.group(1).strip())
        elif CHAPTER_TITLE.match(line):
            if title is not None:
                yield {"id": f"kjv/{title}", "source": "kjv", "text": f"{title}\n\n{' '.join(verses)}"}
            title, verses = line.strip(), []
        else:
            raise CorpusError(f"`bible` printed a line that is neither a chapter title nor a verse: {line[:60]!r}")
    if title is not None:
        yield {"id": f"kjv/{title}", "source": "kjv", "text": f"{title}\n\n{' '.join(verses)}"}


def python_docs_root() -> Path:
    roots = sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))
    if not roots:
        raise CorpusError("no Python documentation sources under /usr/share/doc/python3.X/html/_sources: install "
                          "Debian's python3.11-doc (or another python3.X-doc)")
    return roots[-1]


def python_docs_documents() -> Iterator[dict[str, str]]:
    root = python_docs_root()
    for path in sorted(root.rglob("*.rst.txt")):
        text = re.sub(r"\n{3,}", "\n\n", path.read_text(encoding="utf-8").strip())
        if text:
            yield {"id": f"python-docs/{path.relative_to(root).as_posix().removesuffix('.rst.txt')}",
                   "source": "python-docs", "text": text}


READERS = {"kjv": kjv_documents, "python-docs": python_docs_documents}


def is_validation(document_id: str) -> bool:
    """Whether a document is held out: a stable hash of its id, so a document is wholly in one split."""
    digest = hashlib.sha256(document_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_SHARE


def package_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                            check=False)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, as a transformers `PreTrainedTokenizerFast` with `<s>`, `</s>`
    and `<pad>` (ids 0, 1, 2). It adds no special tokens itself: documents are joined with `</s>` when packed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def build(output_dir: Path, sources: list[str], vocab_size: int) -> dict[str, Any]:
    """Read the sources, split them, save the dataset and the tokenizer into `output_dir` (a new folder, written
    whole or not at all), and return the summary also written as `corpus.json`."""
    from datasets import Dataset, DatasetDict

    if output_dir.exists():
        raise CorpusError(f"{output_dir} exists; remove it yourself or choose another --output-dir")
    documents = {"train": [], "validation": []}
    for name in tqdm(sources, desc="sources", unit="source"):
        for document in READERS[name]():
            documents["validation" if is_validation(document["id"]) else "train"].append(document)
    for split, records in documents.items():
        if not records:
            raise CorpusError(f"the {split} split is empty: the sources {sources} hold too few documents")
    with atomic_output(output_dir, folder=True, overwrite=False) as staging:
        dataset = DatasetDict({split: Dataset.from_list(records) for split, records in documents.items()})
        dataset.save_to_disk(str(staging / "dataset"))
        tokenizer = train_tokenizer([record["text"] for record in documents["train"]], vocab_size)
        tokenizer.save_pretrained(staging / "tokenizer")
        splits = {}
        for split, records in documents.items():
            texts = [record["text"] for record in records]
            tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
            digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
            splits[split] = {
                "documents": len(records), "characters": sum(map(len, texts)), "tokens": tokens, "sha256": digest,
                "documents_per_source": {name: sum(r["source"] == name for r in records) for name in sources},
            }
        summary = {
            "sources": [{"name": name, "package": SOURCES[name].package,
                         "package_version": package_version(SOURCES[name].package),
                         "license": SOURCES[name].license, "description": SOURCES[name].description}
                        for name in sources],
            "validation_share": VALIDATION_SHARE, "vocab_size": len(tokenizer), "splits": splits,
        }
        write_json(staging / "corpus.json", summary)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="implicit-lm corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True, help="the corpus folder to write")
    parser.add_argument("--sources", default="kjv,python-docs",
                        help=f"comma-separated, from {', '.join(SOURCES)} (default: both)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary, special tokens included")
    args = parser.parse_args(argv)
    args.sources = [name.strip() for name in args.sources.split(",") if name.strip()]
    unknown = [name for name in args.sources if name not in SOURCES]
    if unknown or not args.sources:
        parser.error(f"--sources: unknown {unknown}; choose from {', '.join(SOURCES)}")
    if args.vocab_size < 260:
        parser.error(f"--vocab-size must cover the 256 bytes and the special tokens, got {args.vocab_size}")
    return args


@run_cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = build(args.output_dir, args.sources, args.vocab_size)
    for split, entry in summary["splits"].items():
        logger.info("%s: %d documents, %d characters, %d tokens", split, entry["documents"], entry["characters"],
                    entry["tokens"])
    return summary


if __name__ == "__main__":
    main()
