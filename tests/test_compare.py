"""The regression gate: planted regressions are caught, machine-speed changes are not, bad input exits 2."""

from pathlib import Path

import pandas as pd
import pytest

from qbench import cli
from qbench.analysis.gate import compare
from qbench.contract import precisions
from qbench.contract.suite import SuiteError, parse

from .records import by_precision, make_record, make_records, make_runs, slower, write_run
from .test_suite import MINIMAL


def frame(records) -> pd.DataFrame:
    return pd.DataFrame(records)


def planted(change: dict, precision: str = "nf4-dq", seeds=(0,)) -> pd.DataFrame:
    """New results equal to the baseline except `change` (field -> function of the old value) in `precision`."""
    records = make_records(seeds=seeds, run_id="run-b")
    for record in records:
        if record["precision"] == precision:
            for key, how in change.items():
                record[key] = how(record[key])
    return frame(records)


def regressed(comparison: compare.Comparison) -> set[tuple[str, str]]:
    return set(zip(comparison.regressions["precision"], comparison.regressions["metric"], strict=True))


def runs_planted(change: dict, precision: str = "nf4-dq", count: int = 6) -> pd.DataFrame:
    """`count` new runs equal to make_runs' except `change` (field -> function of the old value) in `precision`."""
    records = make_runs(count, prefix="new")
    for record in records:
        if record["precision"] == precision:
            for key, how in change.items():
                record[key] = how(record[key])
    return frame(records)


def test_identical_results_pass():
    result = compare.compare(frame(make_records()), frame(make_records(run_id="run-b")))
    assert result.exit_code == 0
    assert len(result.regressions) == 0
    ratios = result.checks["metric"].str.startswith("ratio.")
    assert (result.checks.loc[~ratios, "verdict"] == "ok").all()
    assert len(result.checks) > 20  # exact, quality, memory and ratio checks for three precisions
    # one cell a side: a rank test cannot reject, so the speed ratios are not judged (never "ok" on so little)
    assert set(result.checks.loc[ratios, "verdict"]) == {compare.NOT_JUDGED}
    assert all("1 baseline and 1 new cells" in note for note in result.checks.loc[ratios, "note"])


def test_identical_runs_pass_with_every_speed_ratio_judged():
    result = compare.compare(frame(make_runs()), frame(make_runs(prefix="new")))
    assert result.exit_code == 0
    assert (result.checks["verdict"] == "ok").all()
    ratios = result.checks[result.checks["metric"] == "ratio.speed.train_samples_per_s"]
    assert set(ratios["n_baseline"]) == set(ratios["n_new"]) == {6}


def test_recall_at_1_down_5_points_is_a_regression():
    result = compare.compare(frame(make_records()), planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.05}))
    assert result.exit_code == 1
    assert regressed(result) == {("nf4-dq", "quality.eval_after.mean_recall@1")}
    assert "-5.00 points" in result.markdown()


def test_a_forked_tree_s_own_pss_is_shown_but_never_gated_while_the_pss_as_its_own_process_is():
    """The forked tree's PSS moves with what the fork server and other processes share with the cell (+15 % between
    two runs of the same code in a fresh-clone CI): informational; the PSS as its own process is the gated one."""
    key, tree = "memory.eval_after.pss_peak_bytes", "memory.eval_after.tree_pss_peak_bytes"
    base = make_records()
    for record in base:
        record[key], record[tree] = 600 * 2**20, 380 * 2**20
    new = make_records(run_id="run-b")
    for record in new:
        record[key], record[tree] = 600 * 2**20, 380 * 2**20
        if record["precision"] == "int8":
            record[tree] = int(380 * 2**20 * 1.3)
    result = compare.compare(frame(base), frame(new))
    assert result.exit_code == 0, result.regressions
    assert tree not in set(result.checks["metric"])  # informational: in the report, not among the gate's checks
    for record in new:
        if record["precision"] == "int8":
            record[key] = int(600 * 2**20 * 1.3)
    assert regressed(compare.compare(frame(base), frame(new))) == {("int8", key)}


def test_recall_down_less_than_the_tolerance_passes():
    result = compare.compare(frame(make_records()), planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.02}))
    assert result.exit_code == 0


def test_weight_bytes_up_one_block_is_a_mismatch():
    one_block = precisions.BNB_4BIT_BLOCKSIZE * 4 // 8  # 64 four-bit codes
    result = compare.compare(
        frame(make_records()),
        planted({"weights.load.base_bytes": lambda v: v + one_block, "weights.load.quantized_codes_bytes": lambda v: v + one_block}),
    )
    assert result.exit_code == 1
    assert regressed(result) == {("nf4-dq", "weights.load.base_bytes"), ("nf4-dq", "weights.load.quantized_codes_bytes")}
    assert set(result.regressions["verdict"]) == {"mismatch"}
    assert "+32" in result.markdown()


def test_fewer_weight_bytes_is_also_a_mismatch_because_exact_metrics_must_match():
    result = compare.compare(frame(make_records()), planted({"weights.load.base_bytes": lambda v: v - 1}))
    assert regressed(result) == {("nf4-dq", "weights.load.base_bytes")}


def test_nf4_dq_over_bf16_throughput_ratio_down_30_percent_is_a_regression():
    result = compare.compare(frame(make_runs()), runs_planted({"speed.train_samples_per_s": lambda v: v * 0.7}))
    assert result.exit_code == 1
    assert regressed(result) == {("nf4-dq", "ratio.speed.train_samples_per_s")}
    row = result.regressions.iloc[0]
    assert row["baseline"] == pytest.approx(15 / 20) and row["new"] == pytest.approx(0.7 * 15 / 20)
    assert row["n_baseline"] == row["n_new"] == 6 and row["p_value"] < 0.01
    assert "Mann–Whitney" in row["judged_by"]


def test_a_speed_ratio_down_30_percent_on_too_few_cells_is_not_judged_and_never_ok():
    result = compare.compare(frame(make_runs(3)), runs_planted({"speed.train_samples_per_s": lambda v: v * 0.7}, count=1))
    row = result.checks[(result.checks["precision"] == "nf4-dq") & (result.checks["metric"] == "ratio.speed.train_samples_per_s")].iloc[0]
    assert row["verdict"] == compare.NOT_JUDGED
    assert "3 baseline and 1 new cells" in row["note"] and "needs 5 a side" in row["note"]
    assert "3/1" in result.markdown()


def test_a_run_20_percent_slower_everywhere_with_unchanged_ratios_passes():
    new = frame([slower(r, 1 / 0.8) for r in make_runs(prefix="new")])
    assert new.loc[0, "speed.train_samples_per_s"] == pytest.approx(0.8 * 20)
    result = compare.compare(frame(make_runs()), new)
    assert result.exit_code == 0, result.markdown()
    ratios = result.checks[result.checks["metric"] == "ratio.speed.train_samples_per_s"]
    assert set(ratios["verdict"]) == {"ok"} and len(ratios) == 2  # int8 and nf4-dq; bf16 is the denominator
    assert "absolute times and rates are not gated" in result.markdown()


def test_ratios_pair_cells_of_the_same_run_only():
    # two shards measured on machines of different speed: each shard's own bf16 is the denominator
    fast = make_records(run_id="fast")
    slow = [slower(r, 2.0) for r in make_records(run_id="slow")]
    result = compare.compare(frame(make_records()), frame(fast + slow))
    assert result.exit_code == 0


def test_noise_floor_from_seeds_widens_the_allowance():
    seeds = (0, 1, 2, 3)
    old = make_records(seeds=seeds)
    for record in old:  # recall spread of about 6 points between seeds
        record["quality.eval_after.mean_recall@1"] += {0: -0.06, 1: 0.0, 2: 0.06, 3: 0.0}[record["seed"]]
    drop = planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.04}, seeds=seeds)
    for record_index, record in drop.iterrows():
        drop.loc[record_index, "quality.eval_after.mean_recall@1"] += {0: -0.06, 1: 0.0, 2: 0.06, 3: 0.0}[record["seed"]]
    noisy = compare.compare(frame(old), drop)
    row = noisy.checks[(noisy.checks["precision"] == "nf4-dq") & (noisy.checks["metric"] == "quality.eval_after.mean_recall@1")].iloc[0]
    assert row["noise"] > 0.04 and row["verdict"] == "ok"
    # without the seeds' spread, the same 4-point drop is beyond the 3-point tolerance: caught
    quiet = compare.compare(frame(make_records(seeds=seeds)), planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.04}, seeds=seeds))
    assert ("nf4-dq", "quality.eval_after.mean_recall@1") in regressed(quiet)


def test_failed_or_missing_cells_are_regressions():
    new = by_precision(make_records(run_id="run-b"))
    new["nf4-dq"] = make_record("nf4-dq", run_id="run-b", status="failed", error="RuntimeError: boom")
    del new["int8"]
    result = compare.compare(frame(make_records()), frame(list(new.values())))
    assert result.exit_code == 1
    verdicts = dict(zip(result.regressions["precision"], result.regressions["verdict"], strict=True))
    assert verdicts == {"int8": "missing", "nf4-dq": "failed"}
    assert "RuntimeError: boom" in result.markdown()


def test_a_changed_configuration_makes_the_input_unusable():
    new = [make_record(p, run_id="run-b", config__train__steps=20) for p in ("bf16", "int8", "nf4-dq")]
    result = compare.compare(frame(make_records()), frame(new))
    assert result.exit_code == 2
    assert any("config.train.steps differs" in p for p in result.problems)
    assert "refresh" in result.markdown()


def test_cpu_baseline_against_cuda_results_is_unusable():
    new = [make_record(p, run_id="run-b", env__device="cuda:0") for p in ("bf16", "int8", "nf4-dq")]
    assert compare.compare(frame(make_records()), frame(new)).exit_code == 2


def test_perplexity_records_work_without_special_cases():
    def lm(precision: str, ppl: float) -> dict:
        record = make_record(precision, task="causal_lm", model="builtin:tiny-llama")
        for key in [k for k in record if k.startswith("quality.")]:
            del record[key]
        record.update({"quality.eval_after.perplexity": ppl, "quality.eval_after.bits_per_byte": 1.5})
        return record

    old = frame([lm("bf16", 10.0), lm("nf4-dq", 10.5)])
    worse = compare.compare(old, frame([lm("bf16", 10.0), lm("nf4-dq", 11.5)]))  # +9.5 %: lower is better
    better = compare.compare(old, frame([lm("bf16", 10.0), lm("nf4-dq", 9.0)]))
    assert regressed(worse) == {("nf4-dq", "quality.eval_after.perplexity")}
    assert better.exit_code == 0
    assert "improved" in set(better.checks["verdict"])


def test_command_line_tolerance_beats_the_suite_and_the_suite_beats_the_default():
    suite = parse(MINIMAL + '[compare.tolerances]\n"quality.*recall@1" = { abs = 0.10 }\n')
    settings = compare.Settings.build(suite.compare, [compare.parse_tolerance("quality.eval_after.mean_recall@1=abs:0.01")])
    assert settings.tolerance_for("quality.eval_after.mean_recall@1", "quality")[0].abs == 0.01
    assert settings.tolerance_for("quality.eval_after.i2t_recall@1", "quality")[0].abs == 0.10
    assert settings.tolerance_for("quality.eval_after.i2t_recall@5", "quality")[0].abs == 0.03
    assert settings.tolerance_for("weights.load.base_bytes", "exact")[0] == compare.EXACT
    drop = planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.05})
    assert compare.compare(frame(make_records()), drop, compare.Settings.build(suite.compare)).exit_code == 0


def test_speed_ratio_tolerance_from_the_suite_applies():
    suite = parse(MINIMAL + '[compare.tolerances]\n"ratio.speed.*" = { rel = 0.5 }\n')
    drop = runs_planted({"speed.train_samples_per_s": lambda v: v * 0.7})
    assert compare.compare(frame(make_runs()), drop, compare.Settings.build(suite.compare)).exit_code == 0
    assert compare.compare(frame(make_runs()), drop).exit_code == 1


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[compare.tolerances]\n"quality.*" = { abss = 0.1 }\n', "unknown key"),
        ('[compare.tolerances]\n"quality.*" = { abs = -1 }\n', "greater than or equal to 0"),
        ('[compare.tolerances]\n"quality.*" = {}\n', "needs abs, rel or ignore"),
        ('[compare.tolerances]\n"quality.eval_after.recal@1" = { abs = 0.1 }\n', "not a metric qbench compares"),
        ('[compare]\nspeed_ratios = ["weights.load.base_bytes"]\n', "not speed fields"),
        ('[compare]\nnoise_sigma = 2\n', "did you mean 'noise_sigmas'"),
    ],
)
def test_the_suite_compare_table_is_validated(table: str, expected: str):
    with pytest.raises(SuiteError) as caught:
        parse(MINIMAL + table, "s.toml")
    assert any(expected in problem and problem.startswith("compare.") for problem in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("bad", ["quality.*", "=abs:1", "quality.*=abs:x", "quality.*=fast:1"])
def test_bad_command_line_tolerances_are_rejected(bad: str):
    with pytest.raises(ValueError):
        compare.parse_tolerance(bad)


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """A baseline, the same again, and one with nf4-dq's recall 7 points lower."""
    records = make_records(run_id="run-c")
    by_precision(records)["nf4-dq"]["quality.eval_after.mean_recall@1"] -= 0.07
    return {
        "baseline": write_run(tmp_path / "baseline", make_records()),
        "same": write_run(tmp_path / "same", make_records(run_id="run-b")),
        "worse": write_run(tmp_path / "worse", records),
        "nowhere": tmp_path / "nowhere",
    }


@pytest.mark.parametrize(("new", "options", "code"), [
    ("same", [], 0), ("worse", [], 1), ("nowhere", [], 2), ("same", ["--tolerance", "nonsense"], 2),
])
def test_cli_exit_codes(runs: dict[str, Path], new: str, options: list[str], code: int):
    assert cli.main(["compare", str(runs["baseline"]), str(runs[new]), *options]) == code


def test_cli_appends_a_markdown_summary_and_prints_the_regression(runs: dict[str, Path], tmp_path: Path, capsys):
    summary = tmp_path / "summary.md"
    cli.main(["compare", str(runs["baseline"]), str(runs["same"]), "--markdown", str(summary)])
    cli.main(["compare", str(runs["baseline"]), str(runs["worse"]), "--markdown", str(summary)])
    text = summary.read_text()
    assert "✅ no regression" in text and "❌ 1 regression(s)" in text
    assert "nf4-dq quality.eval_after.mean_recall@1" in capsys.readouterr().out


def test_cli_compares_an_exported_csv_against_a_run_directory(tmp_path: Path):
    baseline = write_run(tmp_path / "baseline", make_records())
    exported = tmp_path / "results.csv"
    pd.DataFrame(make_records(run_id="run-b")).to_csv(exported, index=False)
    assert cli.main(["compare", str(baseline), str(exported)]) == 0
    assert cli.main(["compare", str(exported), str(baseline)]) == 0


def test_cli_takes_the_compare_table_from_the_new_runs_suite_text(tmp_path: Path):
    loose = MINIMAL + '[compare]\nspeed_ratios = ["speed.train_samples_per_s"]\nnoise_sigmas = 3\n[compare.tolerances]\n"quality.*recall@1" = { abs = 0.10 }\n'
    baseline = write_run(tmp_path / "baseline", make_records())
    records = make_records(run_id="run-b")
    by_precision(records)["nf4-dq"]["quality.eval_after.mean_recall@1"] -= 0.05
    new = write_run(tmp_path / "new", records, suite_text=loose)
    assert cli.main(["compare", str(baseline), str(new)]) == 0
    strict = tmp_path / "strict.toml"
    strict.write_text(MINIMAL)
    assert cli.main(["compare", str(baseline), str(new), "--suite", str(strict)]) == 1


def test_the_ci_suite_tolerances_catch_the_planted_regressions_and_pass_a_slower_machine():
    from qbench.contract.suite import load

    from .conftest import SUITES

    settings = compare.Settings.build(load(SUITES / "ci.toml").suite.compare)
    baseline = frame(make_runs())
    within_tolerance = runs_planted({"speed.train_samples_per_s": lambda v: v * 0.85})
    assert compare.compare(baseline, within_tolerance, settings).exit_code == 0
    ratio_down_30 = runs_planted({"speed.train_samples_per_s": lambda v: v * 0.7})
    assert regressed(compare.compare(baseline, ratio_down_30, settings)) == {("nf4-dq", "ratio.speed.train_samples_per_s")}
    everything_slower = frame([slower(r, 1 / 0.8) for r in make_runs(prefix="new")])
    assert compare.compare(baseline, everything_slower, settings).exit_code == 0
    recall_down_5 = runs_planted({"quality.eval_after.mean_recall@1": lambda v: v - 0.05})
    assert compare.compare(baseline, recall_down_5, settings).exit_code == 1


def test_a_bad_compare_table_in_the_stored_suite_makes_the_input_unusable(tmp_path: Path, capsys):
    baseline = write_run(tmp_path / "baseline", make_records())
    new = write_run(tmp_path / "new", make_records(run_id="run-b"), suite_text='[compare]\nnoise_sigmas = "three"\n')
    assert cli.main(["compare", str(baseline), str(new)]) == 2
    assert "compare.noise_sigmas" in capsys.readouterr().err


def test_a_speed_ratio_is_judged_by_ranks_so_one_wild_run_neither_fails_nor_hides_a_slowdown():
    # six baseline runs, one of them wild (nf4-dq/bf16 read 0.5 where the others read 0.75)
    wild = make_runs()
    by_precision([r for r in wild if r["run_id"] == "run-0"])["nf4-dq"]["speed.train_samples_per_s"] *= 0.5 / 0.75
    unchanged = frame(make_runs(prefix="new"))
    assert compare.compare(frame(wild), unchanged).exit_code == 0
    slowed = runs_planted({"speed.train_samples_per_s": lambda v: v * 0.6})  # ratio 0.45: 40 % below
    assert regressed(compare.compare(frame(wild), slowed)) == {("nf4-dq", "ratio.speed.train_samples_per_s")}


def test_a_different_torch_thread_count_makes_cpu_results_unusable_and_is_noted_on_a_gpu():
    old = [make_record(p, env__torch_threads=1) for p in ("bf16", "int8", "nf4-dq")]
    new = [make_record(p, run_id="run-b", env__torch_threads=2) for p in ("bf16", "int8", "nf4-dq")]
    on_cpu = compare.compare(frame(old), frame(new))
    assert on_cpu.exit_code == 2
    assert any("torch threads differ on cpu: baseline 1 vs new 2" in p for p in on_cpu.problems)
    for record in old + new:
        record["env.device"] = "cuda:0"
    on_gpu = compare.compare(frame(old), frame(new))
    assert on_gpu.exit_code == 0
    assert any("torch threads differ (baseline 1, new 2)" in note for note in on_gpu.notes)


def test_a_schema_1_baseline_that_named_the_thread_count_cpu_count_still_compares():
    old = [make_record(p, env__cpu_count=1) for p in ("bf16", "int8", "nf4-dq")]
    same = [make_record(p, run_id="run-b", env__torch_threads=1) for p in ("bf16", "int8", "nf4-dq")]
    other = [make_record(p, run_id="run-c", env__torch_threads=2) for p in ("bf16", "int8", "nf4-dq")]
    assert compare.compare(frame(old), frame(same)).exit_code == 0
    assert compare.compare(frame(old), frame(other)).exit_code == 2


# --- non-finite outputs and intervals (issue 11, kinds 1 and 6) ---

def _with(records, **fields):
    for record in records:
        record.update({key.replace("__", "."): value for key, value in fields.items()})
    return records


def test_a_count_of_non_finite_embeddings_that_rose_is_a_regression_even_when_recall_holds():
    baseline = frame(_with(make_records(), quality__eval_after__nonfinite_image_embeddings=0))
    new = _with(make_records(run_id="run-b"), quality__eval_after__nonfinite_image_embeddings=0)
    by_precision(new)["nf4-dq"]["quality.eval_after.nonfinite_image_embeddings"] = 1  # one image embedding is NaN now
    result = compare.compare(baseline, frame(new))
    assert regressed(result) == {("nf4-dq", "quality.eval_after.nonfinite_image_embeddings")}
    row = result.checks[result.checks["metric"] == "quality.eval_after.nonfinite_image_embeddings"].iloc[0]
    assert row["kind"] == "health"


def test_a_rise_of_non_finite_losses_is_not_excused_by_the_seeds_spread():
    seeds = (0, 1, 2)
    baseline = make_records(seeds=seeds)
    for record in baseline:  # the baseline's seeds already disagree: 0, 3 and 0 NaN losses
        record["quality.eval_after.nonfinite_losses"] = 3 if record["seed"] == 1 else 0
    new = make_records(seeds=seeds, run_id="run-b")
    for record in new:
        record["quality.eval_after.nonfinite_losses"] = 3 if record["seed"] == 1 else (1 if record["precision"] == "int8" else 0)
    result = compare.compare(frame(baseline), frame(new))
    assert ("int8", "quality.eval_after.nonfinite_losses") in regressed(result)
    assert ("bf16", "quality.eval_after.nonfinite_losses") not in regressed(result)


def test_interval_bounds_are_never_gated():
    baseline = frame(_with(make_records(), interval__eval_after__mean_recall_1__low=0.5))
    new = frame(_with(make_records(run_id="run-b"), interval__eval_after__mean_recall_1__low=0.1))
    baseline = baseline.rename(columns={"interval.eval_after.mean_recall_1.low": "interval.eval_after.mean_recall@1.low"})
    new = new.rename(columns={"interval.eval_after.mean_recall_1.low": "interval.eval_after.mean_recall@1.low"})
    result = compare.compare(baseline, new)
    assert result.exit_code == 0
    assert not result.checks["metric"].str.startswith("interval.").any()


def test_an_infinite_perplexity_in_the_new_run_is_a_regression():
    baseline = frame(_with(make_records(), quality__eval_after__perplexity=20.0))
    new = _with(make_records(run_id="run-b"), quality__eval_after__perplexity=20.0)
    by_precision(new)["int8"]["quality.eval_after.perplexity"] = float("inf")
    assert regressed(compare.compare(baseline, frame(new))) == {("int8", "quality.eval_after.perplexity")}


def test_sides_that_name_different_baseline_arms_are_unusable():
    # every ratio and delta is taken against the baseline arm: nf4-dq/nf4-dq against nf4-dq/bf16 is no comparison
    new = [make_record(p, run_id="run-b", baseline_precision="nf4-dq") for p in ("bf16", "int8", "nf4-dq")]
    result = compare.compare(frame(make_records()), frame(new))
    assert result.exit_code == 2
    assert any(p.startswith("baseline_precision differs: baseline bf16 vs new nf4-dq") for p in result.problems)


@pytest.mark.parametrize(("column", "old", "new"), [("env.cell_launcher", "forkserver", "subprocess"),
                                                    ("env.cells_side_by_side", 1, 2)])
def test_memory_of_cells_started_differently_on_a_cpu_is_not_judged(column: str, old, new):
    # a forked cell's PSS shares the fork server's and its siblings' pages: 311 MiB forked one at a time,
    # 483 MiB as a subprocess (a Ray task's cell), 227 MiB forked two at a time (the same dense cell)
    baseline = [make_record(p, **{column.replace(".", "__"): old}) for p in ("bf16", "int8", "nf4-dq")]
    changed = [make_record(p, run_id="run-b", memory__all_phases__rss_peak_bytes=2 * make_record(p)["memory.all_phases.rss_peak_bytes"],
                           **{column.replace(".", "__"): new}) for p in ("bf16", "int8", "nf4-dq")]
    result = compare.compare(frame(baseline), frame(changed))
    assert result.exit_code == 0, result.markdown()  # weights, quality and speed ratios still compare
    memory = result.checks[result.checks["metric"] == "memory.all_phases.rss_peak_bytes"]
    assert set(memory["verdict"]) == {compare.NOT_JUDGED} and all(column in note for note in memory["note"])
    assert set(result.checks[result.checks["metric"] == "weights.load.base_bytes"]["verdict"]) == {"ok"}
    # started alike, the doubled memory is a regression
    alike = [dict(r, **{column: old}) for r in changed]
    assert ("int8", "memory.all_phases.rss_peak_bytes") in regressed(compare.compare(frame(baseline), frame(alike)))
