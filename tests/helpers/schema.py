"""The check every real run's folder must pass: each record file is a schema-3 record the record model reads
key for key (nothing undeclared, nothing refused), and run.json is a run manifest it reads."""

from __future__ import annotations

import json
from pathlib import Path

from qbench.contract import record
from qbench.contract.records import UNDECLARED
from qbench.contract.schema import SCHEMA_VERSION


def assert_schema_3_run(run_dir: Path) -> list[dict]:
    """The run's records as on disk, after checking them and run.json against the models."""
    found = []
    for path in sorted((Path(run_dir) / "cells").glob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        assert raw["schema_version"] == SCHEMA_VERSION, path
        assert raw.get("error_type") != UNDECLARED, raw.get("error")  # the writer refused nothing
        assert record.flatten(record.validate(raw)) == raw, path  # every key declared, every value of its type
        found.append(raw)
    manifest = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    assert record.manifest_problem(manifest) is None
    assert manifest["schema_version"] == SCHEMA_VERSION
    return found
