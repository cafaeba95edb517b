"""The fingerprint of the data a run trains and evaluates on: one run folder is about one data set.

The checks before a run read every data file anyway (each annotation and text file whole, every image
decoded); they hash the same bytes as they read them (`FileHashes`), so the fingerprint costs no second
read. A generated set (builtin) is hashed from what the generator made. What is hashed:

- a data file (`data.train`, `data.eval`: a TSV annotation file or a text corpus): its bytes;
- an image of a TSV split: its bytes, under its path as the annotation file writes it (relative to
  `data.image_root`), so that the same data set copied elsewhere has the same fingerprint;
- a builtin split: what the generator gave (the text, or the pixels and captions).

Each split's fingerprint covers its data file and its images in the order the split reads them; the
run's (`sha256`) covers both splits. run.json keeps every file's hash, so that `--resume` can name the
file that changed; each record keeps the fingerprints (`record_fields`), so that a report or `compare`
sees records of other data. No torch, no pandas: the parent and the cell both use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "eval")
PREFIX = "data.fingerprint."


def sha256_of(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


@dataclass
class FileHashes:
    """The files one split read, in reading order: its data file (one entry, keyed by its suite key, e.g.
    "data.eval") and its images (keyed by their path relative to the image root)."""

    data_file: dict[str, str] = field(default_factory=dict)  # suite key -> sha256 of the file's bytes
    images: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of the image's bytes
    bytes_read: int = 0

    def add_data_file(self, key: str, data: bytes | str) -> None:
        self.data_file[key] = sha256_of(data)
        self.bytes_read += len(data)

    def add_image(self, relative: str, digest: str, size: int) -> None:
        self.images[relative] = digest
        self.bytes_read += size

    def digest(self) -> str:
        """The split's fingerprint: its data file's hash and each image's path and hash, in order."""
        lines = [f"{key}\0{digest}" for key, digest in self.data_file.items()]
        lines += [f"image\0{relative}\0{digest}" for relative, digest in self.images.items()]
        return sha256_of("\n".join(lines))


@dataclass(frozen=True)
class DataFingerprint:
    """The data of a run: each split's fingerprint and every file's hash."""

    method: str  # how it was made, in words (the record's data.fingerprint.method)
    splits: dict[str, str]  # "train" / "eval" -> the split's fingerprint
    data_files: dict[str, str]  # "data.train" / "data.eval" -> sha256 of the file (or generated text / content)
    images: dict[str, str] = field(default_factory=dict)  # image path relative to the image root -> sha256
    files: int = 0  # files hashed (0: a generated set)
    bytes_read: int = 0

    @classmethod
    def of(cls, method: str, splits: dict[str, FileHashes], files: int) -> DataFingerprint:
        data_files: dict[str, str] = {}
        images: dict[str, str] = {}
        for hashes in splits.values():
            data_files.update(hashes.data_file)
            images.update(hashes.images)
        return cls(method, {name: hashes.digest() for name, hashes in splits.items()}, data_files, images, files,
                   sum(hashes.bytes_read for hashes in splits.values()))

    @property
    def sha256(self) -> str:
        return sha256_of("\n".join(f"{name}\0{self.splits.get(name, '')}" for name in SPLITS))

    def record_fields(self) -> dict[str, Any]:
        """What every record of the run carries (the `data.fingerprint.*` block)."""
        return {
            f"{PREFIX}sha256": self.sha256,
            **{f"{PREFIX}{name}_sha256": self.splits.get(name) for name in SPLITS},
            f"{PREFIX}files": self.files,
            f"{PREFIX}read_bytes": self.bytes_read,
            f"{PREFIX}method": self.method,
        }

    def manifest(self) -> dict[str, Any]:
        """run.json's `data` entry: enough to say later which file changed."""
        return {"sha256": self.sha256, "method": self.method, "splits": dict(self.splits), "data_files": dict(self.data_files),
                "images": dict(self.images), "files": self.files, "bytes": self.bytes_read}

    @classmethod
    def from_manifest(cls, entry: Any) -> DataFingerprint | None:
        """The fingerprint run.json recorded; None when it holds none (an older run) or not a usable one."""
        try:
            fingerprint = cls(str(entry["method"]), dict(entry["splits"]), dict(entry["data_files"]), dict(entry.get("images") or {}),
                              int(entry.get("files") or 0), int(entry.get("bytes") or 0))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        texts = [*fingerprint.splits.values(), *fingerprint.data_files.values(), *fingerprint.images.values(),
                 *fingerprint.images, *fingerprint.splits, *fingerprint.data_files]
        return fingerprint if all(isinstance(text, str) for text in texts) else None

    def changes(self, now: DataFingerprint, where: dict[str, str] | None = None) -> list[str]:
        """What differs in `now` from this (recorded) fingerprint, one line per file, naming it (`where`: suite key
        -> the path to show, e.g. {"data.eval": "data/eval.tsv", "data.image_root": "data/images"})."""
        where = where or {}
        changed = [f"{key}: {where.get(key, 'the data')} changed" for key in sorted(set(self.data_files) | set(now.data_files))
                   if self.data_files.get(key) != now.data_files.get(key)]
        root = f"{where['data.image_root']}/" if where.get("data.image_root") else ""
        for relative in sorted(set(self.images) | set(now.images)):
            before, after = self.images.get(relative), now.images.get(relative)
            if before != after:
                what = "is new" if before is None else "is no longer read" if after is None else "changed"
                changed.append(f"data.image_root: image {root}{relative} {what}")
        if not changed and self.sha256 != now.sha256:
            changed.append(f"data: the data set's fingerprint changed ({self.method} -> {now.method})")
        return changed
