"""The typed record (schema 3): real records validate, undeclared keys fail, flattening round-trips, the metadata
drives the fields registry, schema 2 converts through the rename table, any other schema is refused."""

from __future__ import annotations

import json
import shutil
import types
import typing
from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis import load
from qbench.analysis.gate import compare
from qbench.contract import fields, record, records, renames, schema
from qbench.contract.suite import LoraSpec, TrainSpec

from .fake_cell import identity as fake_cell_identity
from .records import make_record, make_records, write_run

# the CI baseline as it was committed in schema 2 (before issue 26's refresh), kept to check the conversion
BASELINE = Path(__file__).resolve().parent / "fixtures" / "schema2-ci-baseline"
BASELINE_RECORDS = sorted(BASELINE.glob("*/cells/*.json"))


def _raw(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _converted() -> list[dict]:
    return [renames.convert(_raw(path), 2) for path in BASELINE_RECORDS]


# --- the model ----------------------------------------------------------------------------------------------

def test_the_committed_schema_2_baseline_converts_to_records_the_model_reads_key_for_key():
    assert len(BASELINE_RECORDS) == 9
    for raw, converted in zip(map(_raw, BASELINE_RECORDS), _converted(), strict=True):
        assert raw["schema_version"] == 2
        model = record.validate(converted)
        assert model.identity.schema_version == schema.SCHEMA_VERSION and model.identity.converted_from_schema == 2
        assert record.flatten(model) == converted  # the round trip keeps every key and value, None included
        # one value per concept: the duplicates of schema 2 are one key now, and nothing else was lost
        assert len(converted) == len(raw) - 3 + 1  # config.prepare, config.gradient_checkpointing, train.last_loss; +converted_from
        assert converted["train.final_loss"] == raw["train.last_loss"] == raw["train.final_loss"]


def test_a_record_is_nested_by_what_it_describes():
    model = record.validate(_converted()[1])
    assert model.identity.precision == "int8" and model.outcome.status == "ok"
    assert model.memory.train.rss_peak_bytes == _converted()[1]["memory.train.rss_peak_bytes"]
    assert model.quality.eval_after["mean_recall@1"] == _converted()[1]["quality.eval_after.mean_recall@1"]
    assert model.interval.eval_after["mean_recall@1"].low <= model.quality.eval_after["mean_recall@1"]
    assert model.weights.load.linears.linear8bitlt_count > 0 and model.weights.prepare.base_bytes == model.weights.load.base_bytes
    assert model.time.train.wall_s > 0 and model.config.train.steps == 12


@pytest.mark.parametrize(("key", "value", "why"), [
    ("memory.train.pss_peek_bytes", 1, "not a key of the record model"),  # a typo of a declared key
    ("quality.after.mean_recall@1", 0.5, "not a key of the record model"),  # a schema-2 name in a schema-3 record
    ("fake.anything", 1, "not a key of the record model"),
    ("quality.eval_after.accuracy", 0.5, "no quality metric a task records"),  # a metric nobody declared
    ("weights.load.dtype.float32", 4, "is not <dtype>_bytes"),
    ("weights.load.base_bytes", "538748", "valid integer"),  # text where a number belongs
    ("weights.load.base_bytes", 1.5, "valid integer"),
    ("speed.contended", "true", "valid boolean"),  # text where a boolean belongs
    ("status", "done", "Input should be"),
])
def test_an_undeclared_key_or_a_value_of_another_type_fails_validation(key, value, why):
    with pytest.raises(record.RecordInvalid) as refused:
        record.validate({**_converted()[0], key: value})
    assert refused.value.keys == [key] and why in str(refused.value)


def test_open_parts_take_any_name_their_rule_allows():
    flat = {**_converted()[0], "quality.eval_after.t2i_recall@50": 1.0, "weights.load.dtype.float8_e4m3fn_bytes": 12,
            "test.peak_running": 2, "test.axes": {"lora_r": 8}}
    assert record.flatten(record.validate(flat)) == flat


def test_every_number_carries_its_metadata_and_every_key_is_one_name():
    keys = record.declared_keys()
    assert len(keys) == len(set(keys))
    for key in keys:
        if key.endswith("*"):
            continue
        info = record.key_info(key)
        kinds = set(typing.get_args(info.kind)) if isinstance(info.kind, types.UnionType) else {info.kind}
        if kinds & {int, float}:
            assert (info.figure is None) != (info.setting is None), key  # a measured figure or a setting, never neither


def test_the_metadata_drives_the_fields_registry():
    for key in record.declared_keys():
        info = record.key_info(key.replace("*", "mean_recall@1"))
        spec = fields.spec_for(key.replace("*", "mean_recall@1"))
        figure = info.figure
        if figure is None:
            assert spec is None, key
        elif figure.gate != "interval":
            assert (spec.kind, spec.direction, spec.unit) == (figure.gate, figure.better, figure.unit), key
    assert fields.spec_for("weights.load.base_bytes") == fields.FieldSpec("exact", "lower", "bytes")
    assert fields.spec_for("weights.load.unquantized_share_of_bytes").unit == "fraction"  # a share, not bytes
    assert fields.spec_for("quality.eval_after.perplexity") == fields.FieldSpec("quality", "lower", "perplexity")
    assert fields.spec_for("quality.eval_before.nonfinite_losses").kind == "health"
    assert fields.spec_for("interval.eval_after.mean_recall@1.low") == fields.FieldSpec("interval", None, "fraction")
    assert fields.spec_for("ratio.speed.train_samples_per_cpu_s") == fields.FieldSpec("speed-ratio", "higher", "ratio")
    assert fields.spec_for("ratio.speed.step_time_p50_s").direction == "lower"
    assert fields.spec_for("config.train.lr") is None and fields.spec_for("precision") is None
    assert fields.scale("memory.all_phases.pss_peak_bytes") == (1 / 2**20, "MiB")
    assert fields.label("quality.eval_after.mean_recall@1") == "after mean recall@1"


def test_the_records_settings_are_the_suites_settings():
    assert set(record.TrainSettings.model_fields) == set(TrainSpec.model_fields)
    assert set(record.LoraSettings.model_fields) == set(LoraSpec.model_fields)


def test_every_package_version_the_environment_records_is_declared():
    from qbench.machine.environment import PACKAGES

    for name in PACKAGES:
        assert record.key_info(f"env.{name}_version") is not None, name


def test_the_fake_cell_writes_the_schema_qbench_writes():
    spec = {"run_id": "r", "cell_id": "bf16-seed0", "precision": "bf16", "seed": 0}
    assert fake_cell_identity(spec, {"name": "s", "task": "clip"})["schema_version"] == schema.SCHEMA_VERSION


# --- writing --------------------------------------------------------------------------------------------------

def test_the_writer_never_writes_an_undeclared_key_and_says_so_in_a_failed_record(tmp_path):
    path = tmp_path / "cells" / "bf16-seed0.json"
    written = records.write_record(path, {**make_record("bf16"), "memory.train.new_gadget_bytes": 5}, attempt=None)
    assert _raw(path) == written
    assert "memory.train.new_gadget_bytes" not in written and written["weights.load.base_bytes"] == 445_450
    assert written["status"] == "failed" and written["error_type"] == records.UNDECLARED
    assert "memory.train.new_gadget_bytes: not a key of the record model" in written["error"]


def test_run_json_is_written_and_read_through_its_model(tmp_path):
    records.write_manifest(tmp_path, {"schema_version": 3, "suite": "ci", "cells": [{"precision": "bf16", "seed": 0}]})
    assert records.read_manifest(tmp_path)["cells"] == [{"precision": "bf16", "seed": 0}]
    with pytest.raises(ValueError, match="run.json: .*surprise: not a field of run.json"):
        records.write_manifest(tmp_path, {"suite": "ci", "surprise": 1})
    (tmp_path / "run.json").write_text(json.dumps({"suite": "ci", "cells": "all"}))
    assert records.read_manifest(tmp_path) is None


# --- reading: types survive, schema 2 converts, other schemas are refused ---------------------------------------

def test_booleans_and_lists_stay_what_they_are_through_a_csv_table(tmp_path):
    rows = make_records()
    for row, contended in zip(rows, (True, False, None), strict=True):
        row.update({"speed.contended": contended, "per_window.scored_tokens": [128, 128, 64],
                    "per_window.eval_after.window_nll": [400.5, float("nan"), 12.25]})
    load.exportable(load.frame_of(rows)).to_csv(tmp_path / "results.csv", index=False)
    table = load.load_results([tmp_path / "results.csv"])
    assert list(table["speed.contended"]) == [True, False, None]
    assert table["per_window.scored_tokens"].iloc[0] == [128, 128, 64]
    assert table["per_window.eval_after.window_nll"].iloc[2][2] == 12.25
    assert table["weights.load.base_bytes"].dtype.kind in "if"
    assert compare.contended_cells(table) == ["bf16-seed0 (run-a)"]


def test_the_committed_baseline_compares_with_itself_and_says_it_converted(capsys):
    assert cli.main(["compare", str(BASELINE), str(BASELINE)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "9 baseline record(s) of schema 2 converted to schema 3" in shown
    assert "9 new record(s) of schema 2 converted to schema 3" in shown and "no regression" in shown


def test_a_schema_2_table_converts_like_its_records(tmp_path):
    (run,) = sorted({path.parents[1] for path in BASELINE_RECORDS})[:1]
    table = load.load_results([run / "results.csv"]).set_index("cell_id").sort_index()
    frame = load.load_results([run]).set_index("cell_id").sort_index()
    assert set(table["converted_from_schema"]) == {2}
    for column in ("weights.load.base_bytes", "quality.eval_after.mean_recall@1", "memory.all_phases.tree_pss_peak_bytes",
                   "time.cell.wall_s", "config.train.prepare", "train.final_loss"):
        assert list(table[column]) == list(frame[column]), column
    assert not any(column in table.columns for column in ("config.prepare", "train.last_loss", "weights.base_bytes"))
    # the baseline's cells were forked: schema 2's PSS left out the fork server's share, which schema 3's counts
    assert "memory.all_phases.pss_peak_bytes" not in frame.columns and "memory.all_phases.pss_peak_bytes" not in table.columns


@pytest.mark.parametrize("version", [1, 4, "2", None])
def test_compare_and_report_refuse_a_schema_they_cannot_convert_with_one_line(tmp_path, capsys, version):
    old = write_run(tmp_path / "old", [make_record(p, schema_version=version) for p in ("bf16", "int8", "nf4-dq")])
    new = write_run(tmp_path / "new", make_records(run_id="run-b"))
    assert cli.main(["compare", str(old), str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"a record of schema {version!r}, but this qbench writes schema 3" in err
    assert "refresh the baseline" in err
    assert cli.main(["report", str(old), "--out", str(tmp_path / "report")]) == 2
    assert f"schema {version!r}" in capsys.readouterr().err


def test_a_schema_1_table_is_refused_too(tmp_path, capsys):
    rows = [make_record(p, schema_version=1) for p in ("bf16", "int8")]
    pd.DataFrame(rows).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(records.ResultsError, match="a record of schema 1"):
        load.load_results([tmp_path / "old.csv"])
    pd.DataFrame(rows).drop(columns="schema_version").to_csv(tmp_path / "unversioned.csv", index=False)
    with pytest.raises(records.ResultsError, match="a record of schema None"):  # a table that does not say its schema
        load.load_results([tmp_path / "unversioned.csv"])


def test_a_schema_2_run_folder_compares_with_a_schema_3_one(tmp_path, capsys):
    new = tmp_path / "new"
    shutil.copytree(BASELINE_RECORDS[0].parents[1], new)
    for path in (new / "cells").glob("*.json"):  # the same records as schema 3, written through the model
        path.unlink()
        converted = renames.convert(_raw(BASELINE_RECORDS[0].parent / path.name), 2)
        records.write_record(path, {k: v for k, v in converted.items() if k != "converted_from_schema"}, None)
        assert _raw(path)["schema_version"] == 3
    assert cli.main(["compare", str(BASELINE_RECORDS[0].parents[1]), str(new)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "3 baseline record(s) of schema 2 converted" in shown and "new record(s)" not in shown


# --- the rename table ---------------------------------------------------------------------------------------

def test_the_rename_table_names_declared_keys_only():
    for old, new in renames.RENAMES.items():
        assert old.endswith(".") == new.endswith("."), old
        if not new.endswith("."):
            assert record.key_info(new) is not None, new
    assert renames.renamed("quality.after.i2t_recall@5") == "quality.eval_after.i2t_recall@5"
    assert renames.renamed("format.train.quant_types") == "weights.prepare.linears.quant_types"  # the longest prefix wins
    assert renames.renamed("weights.train.dtype.uint8_bytes") == "weights.prepare.dtype.uint8_bytes"
    assert renames.renamed("weights.adapter_bytes") == "weights.adapter_bytes"  # kept


def test_the_rename_script_renames_keys_in_code_and_prose_but_not_words():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "rename_record_keys.py"
    spec = importlib.util.spec_from_file_location("rename_record_keys", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ('row["weights.base_bytes"], f"weights.quant_state.{kind}_bytes", `format.train.*`, ratio.time.train_s, '
            'memory.peak_pss_bytes; about the format. Then quality.after.mean_recall@1 and weights.base_bytes_total')
    renamed, count = module.rename_text(text)
    assert renamed == ('row["weights.load.base_bytes"], f"weights.load.quant_state.{kind}_bytes", `weights.prepare.linears.*`, '
                       'ratio.time.train.wall_s, memory.all_phases.pss_peak_bytes; about the format. Then '
                       'quality.eval_after.mean_recall@1 and weights.base_bytes_total')
    assert count == 6
