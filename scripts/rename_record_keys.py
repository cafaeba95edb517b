"""Rename schema-2 record keys to their schema-3 names in source files and documents, from the one table
(qbench.contract.renames.RENAMES), and list what it cannot rename by itself.

    python scripts/rename_record_keys.py FILE...            # rewrite the files in place
    python scripts/rename_record_keys.py --check FILE...    # list what would change; exit 1 if anything would

An exact key is renamed where it stands as a whole key (not inside a longer one; `ratio.<key>` included).
A prefix (a key ending in ".") is renamed where a key's next part follows it (`quality.after.mean_recall@1`, `weights.dtype.<dtype>_bytes`,
f"weights.quant_state.{kind}_bytes"), never in prose ("the format."). Keys built from parts in code
(f"quality.{phase}.", `.replace(".after.", ".before.")`, `time.{part}_s`) are not keys here: grep for the
parts the table renames (before/after, _s, torch_max_, peak_, process_baseline_, format, weights.train).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qbench.contract.renames import RENAMES  # noqa: E402

# a run of characters a record key (or a key pattern, a template, a placeholder) is made of
TOKEN = re.compile(r"(?<![\w.])[A-Za-z_][\w@.{}<>*|-]*")


def _renamed(token: str) -> str:
    """`token` with its schema-2 key renamed: an exact key when it is the whole token, a prefix (the longest)
    when more of the key follows it."""
    if token.startswith("ratio."):  # a ratio compare derives, of a record key
        return "ratio." + _renamed(token.removeprefix("ratio."))
    if token in RENAMES and not token.endswith("."):
        return RENAMES[token]
    prefixes = [old for old in RENAMES if old.endswith(".") and token.startswith(old) and len(token) > len(old)]
    if prefixes:
        longest = max(prefixes, key=len)
        return RENAMES[longest] + token[len(longest):]
    return token


def rename_text(text: str) -> tuple[str, int]:
    """`text` with every schema-2 key renamed, and how many were."""
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        new = _renamed(match.group(0))
        count += new != match.group(0)
        return new

    return TOKEN.sub(replace, text), count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the files that would change")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    changed = 0
    for path in args.files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        renamed, count = rename_text(text)
        if count:
            changed += 1
            print(f"{path}: {count} key(s)")
            if not args.check:
                path.write_text(renamed, encoding="utf-8")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
