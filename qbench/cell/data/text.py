"""Text corpora for causal-LM cells: the builtin pydoc corpus and plain-text / JSONL files.

The builtin corpus is the reference documentation that ships inside CPython
(``pydoc_data.topics.topics``): real English, written outside this project, present offline on
every machine. Its topics, in sorted order, are split into three disjoint parts:

- *pretrain*: the leading three quarters, used only to pretrain the builtin tiny Llama
  (``qbench.zoo.llama``);
- *train*: about 60% of the trailing topics, what the LoRA fine-tune trains on;
- *eval*: the other trailing topics, held out for perplexity before and after fine-tuning.

The text depends on the Python version, so the version is written into ``TextCorpus.source``
and the hash changes with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

from qbench.cell.data.lines import DataError, physical_lines, read_text
from qbench.contract.fingerprint import FileHashes
from qbench.contract.tasks import builtin_names

# The fine-tune domain is the tail of the sorted topics holding at least this share of the
# characters: string-methods .. yield for Python 3.11, half of it the library's "Built-in Types"
# chapter (str, sequence, mapping methods) and a quarter the data model's type hierarchy. The
# base model is pretrained on everything before it, so the fine-tune adapts it to text it has
# seen little of, which is how LoRA is used in practice.
PYDOC_FINETUNE_SHARE = 0.25
# Inside the fine-tune domain, topics are dealt in sorted order, each to the part furthest below
# its share of characters: deterministic, and sizes stay near these shares although single
# topics range from 0.2k to 38k characters.
PYDOC_FINETUNE_SPLIT: dict[str, float] = {"train": 0.6, "eval": 0.4}

TOPIC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextCorpus:
    """A fine-tune corpus: training text, held-out evaluation text and their provenance.

    ``sha256`` is the hex digest of ``train`` and ``eval`` as UTF-8, joined by one NUL byte
    (see ``corpus_sha256``), so it identifies exactly the text a cell trained and evaluated on.
    """

    train: str
    eval: str
    source: str
    sha256: str

    @classmethod
    def from_parts(cls, train: str, eval: str, source: str) -> TextCorpus:
        """Build a corpus and compute its hash from the two texts."""
        return cls(train=train, eval=eval, source=source, sha256=corpus_sha256(train, eval))


def corpus_sha256(train: str, eval: str) -> str:
    """The hash stored in ``TextCorpus.sha256``: sha256 of train + NUL + eval, UTF-8 encoded."""
    digest = hashlib.sha256()
    digest.update(train.encode("utf-8"))
    digest.update(b"\0")
    digest.update(eval.encode("utf-8"))
    return digest.hexdigest()


def builtin_corpus(name: str = "pydoc") -> TextCorpus:
    """The fine-tune train and held-out eval parts of a builtin corpus."""
    parts = _pydoc_parts(_check_builtin_name(name))
    return TextCorpus.from_parts(
        train=TOPIC_SEPARATOR.join(parts["train"].values()),
        eval=TOPIC_SEPARATOR.join(parts["eval"].values()),
        source=_pydoc_source(),
    )


def pretrain_text(name: str = "pydoc") -> str:
    """The part of a builtin corpus the base model is pretrained on (disjoint from train and eval)."""
    parts = _pydoc_parts(_check_builtin_name(name))
    return TOPIC_SEPARATOR.join(parts["pretrain"].values())


def builtin_topics(name: str = "pydoc") -> dict[str, list[str]]:
    """Which topic names went into each part (pretrain, train, eval), in corpus order."""
    parts = _pydoc_parts(_check_builtin_name(name))
    return {part: list(topics) for part, topics in parts.items()}


def load_text_file(path: str | pathlib.Path, hashes: FileHashes | None = None, key: str = "data") -> str:
    """Read a ``.txt`` file, or a ``.jsonl`` file whose lines each hold a "text" string.

    A ``.txt`` file is its text as is, except that a leading byte order mark is dropped and CRLF line
    endings read as LF (``qbench.cell.data.lines.read_text``). JSONL lines are physical lines (split at LF
    only, as ``wc -l`` counts them); their records are joined with a blank line between them, and blank
    lines are skipped. Raises DataError (a ValueError) naming the file, and the physical line where it
    applies, when the content is unusable: missing, binary, not UTF-8, empty, bad JSON, no "text" string.
    `hashes` (the data fingerprint, suite key `key`) gets the hash of the file's bytes as read.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    on_read = (lambda data: hashes.add_data_file(key, data)) if hashes is not None else None
    if suffix == ".txt":
        text = read_text(path, "text file", on_read)
    elif suffix == ".jsonl":
        text = TOPIC_SEPARATOR.join(_read_jsonl_texts(path, on_read))
    else:
        raise DataError(f"{path}: unsupported text file type {suffix!r}; expected .txt or .jsonl")
    if not text.strip():
        raise DataError(f"{path}: contains no text")
    return text


def _shown_keys(record: dict) -> str:
    keys = [repr(key) for key in list(record)[:8]]
    return ", ".join(keys) + (", ..." if len(record) > 8 else "") if keys else "none"


def _json_kind(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "boolean" if value is not None else "null"
    return {list: "array", dict: "object", str: "string"}.get(type(value), "number")


def _read_jsonl_texts(path: pathlib.Path, on_read: Any = None) -> list[str]:
    texts = []
    for line_number, line in physical_lines(path, "JSONL file", on_read):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        except (ValueError, RecursionError) as error:  # a number of more than 4300 digits; nesting too deep
            raise DataError(f"{where}: invalid JSON ({type(error).__name__})") from None
        if not isinstance(record, dict):
            raise DataError(f'{where}: a line must be a JSON object with a "text" field, not a JSON {_json_kind(record)}')
        if "text" not in record:
            raise DataError(f'{where}: missing field "text" (the object has fields {_shown_keys(record)})')
        if not isinstance(record["text"], str):
            raise DataError(f'{where}: field "text" must be a string, not a JSON {_json_kind(record["text"])}')
        texts.append(record["text"])
    return texts


def _check_builtin_name(name: str) -> str:
    known = builtin_names("causal_lm")
    if name not in known:
        raise ValueError(f"unknown builtin corpus {name!r}; known: {', '.join(sorted(known))}")
    return name


def _pydoc_source() -> str:
    version = ".".join(str(part) for part in sys.version_info[:3])
    return f"pydoc_data.topics.topics (Python {version} reference documentation)"


@functools.cache
def _pydoc_parts(name: str) -> dict[str, dict[str, str]]:
    """Pretrain = the leading sorted topics; the trailing ones are dealt to train and eval."""
    from pydoc_data.topics import topics  # imported here: no work at import time

    names = sorted(topics)
    total_chars = sum(len(topics[topic]) for topic in names)
    first_finetune = len(names)
    finetune_chars = 0
    while finetune_chars < PYDOC_FINETUNE_SHARE * total_chars:
        first_finetune -= 1
        finetune_chars += len(topics[names[first_finetune]])

    parts: dict[str, dict[str, str]] = {"pretrain": {topic: topics[topic] for topic in names[:first_finetune]}}
    parts.update({part: {} for part in PYDOC_FINETUNE_SPLIT})
    chars = dict.fromkeys(PYDOC_FINETUNE_SPLIT, 0)
    for topic in names[first_finetune:]:
        neediest = min(PYDOC_FINETUNE_SPLIT, key=lambda part: chars[part] / PYDOC_FINETUNE_SPLIT[part])
        parts[neediest][topic] = topics[topic]
        chars[neediest] += len(topics[topic])
    return parts
