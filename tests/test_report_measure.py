"""The measurement parts of summary.md: quantization damage, why 4-bit is not 4x smaller, memory per phase."""

from __future__ import annotations

import pandas as pd
import pytest

from qbench.analysis.report import explain, summary, tables, write

MiB = 1024 * 1024


def row(precision: str, **fields) -> dict:
    base = {"suite": "s", "task": "clip", "baseline_precision": "bf16", "precision": precision, "seed": 0, "status": "ok",
            "cell_id": f"{precision}-seed0", "error": None}
    return {**base, **fields}


def weights_of(codes: int, state: dict[str, int], unquantized: dict[str, int], quantized_params: int, params: int) -> dict:
    fields = {f"weights.load.quant_state.{k}_bytes": v for k, v in state.items()}
    fields.update({f"weights.load.unquantized.{k}_bytes": v for k, v in unquantized.items()})
    state_bytes, unquantized_bytes = sum(state.values()), sum(unquantized.values())
    fields.update({
        "weights.load.base_bytes": codes + state_bytes + unquantized_bytes,
        "weights.load.quantized_codes_bytes": codes,
        "weights.load.quant_state_bytes": state_bytes,
        "weights.load.unquantized_bytes": unquantized_bytes,
        "weights.load.quantized_params": quantized_params,
        "weights.load.params": params,
        "weights.load.quantized_share_of_params": quantized_params / params,
    })
    return fields


BF16 = row("bf16", **weights_of(0, {}, {"dense_linear": 1_800_000, "embedding": 200_000}, 0, 1_000_000),
           **{"quality.eval_before.mean_recall@1": 0.50, "weights.load.error.rel_mean": 0.0016, "weights.load.error.rel_max": 0.0017})
NF4 = row("nf4", **weights_of(450_000, {"absmax": 56_250, "code_table": 750},
                              {"embedding": 150_000, "norm": 10_000, "dense_linear": 40_000}, 900_000, 1_000_000),
          **{"quality.eval_before.mean_recall@1": 0.44, "weights.load.error.rel_mean": 0.092, "weights.load.error.rel_max": 0.095})


def test_the_explanation_derives_every_figure_from_the_byte_accounting():
    text = explain.weight_bytes_explanation(pd.DataFrame([BF16, NF4]))
    assert "**nf4**: the base takes 690.4 KiB against 1.91 MiB for bf16: 2.83x smaller, not 4x." in text
    assert "900,000 quantized weights take 4.51 bits each, not 4: 4 bits of code plus 0.51 bits of quantization state" in text
    assert "absmax per block 0.500" in text and "4-bit code tables 0.007" in text
    assert "10.0% of the parameters stay unquantized" in text and "28.3% of this base" in text
    assert "embeddings 146.5 KiB" in text and "norms 9.8 KiB" in text
    assert "Bare 4-bit codes for every parameter would take 488.3 KiB (4.0x smaller)" in text
    assert "bf16**" not in text  # the dense baseline needs no explanation


def test_without_a_dense_baseline_the_explanation_estimates_16_bits():
    text = explain.weight_bytes_explanation(pd.DataFrame([NF4]))
    assert "against an estimated 1.91 MiB at 16 bits: 2.83x smaller" in text


def test_double_quantization_that_costs_more_than_it_saves_is_called_out():
    dq = row("nf4-dq", **weights_of(450_000, {"absmax": 14_063, "nested_absmax": 220, "code_table": 750,
                                              "nested_code_table": 51_200, "offset": 200},
                                    {"embedding": 150_000, "norm": 10_000, "dense_linear": 40_000}, 900_000, 1_000_000))
    text = explain.weight_bytes_explanation(pd.DataFrame([BF16, NF4, dq]))
    assert "**nf4-dq** is 9.2 KiB *larger* than nf4" in text
    assert "the 50 layers" in text


def test_quantization_damage_puts_the_base_metric_next_to_the_baselines_before_training():
    table = tables.quantization_damage(pd.DataFrame([BF16, NF4]))
    assert table.loc["nf4", "mean recall@1 before, this base (%)"] == pytest.approx(44.0)
    assert table.loc["nf4", "mean recall@1 before, bf16 base (%)"] == pytest.approx(50.0)
    assert table.loc["nf4", "Δ mean recall@1 vs bf16 before training (points)"] == pytest.approx(-6.0)
    assert table.loc["nf4", "weight error, mean (%)"] == pytest.approx(9.2)
    assert table.loc["bf16", "Δ mean recall@1 vs bf16 before training (points)"] == 0


def test_memory_table_orders_phases_and_leaves_out_sources_never_measured():
    records = [
        row(p, **{"memory.train.sampled_s": 1.0, "memory.load.sampled_s": 1.0, "memory.train.rss_peak_bytes": 300 * MiB,
                  "memory.load.rss_peak_bytes": rss * MiB, "memory.train.nvml_process_peak_bytes": None})
        for p, rss in (("bf16", 200), ("nf4", 150))
    ]
    table = tables.memory_table(pd.DataFrame(records))
    assert list(table.columns) == ["load RSS", "train RSS"]
    assert table.loc["nf4", "load RSS"] == pytest.approx(150.0)


def test_summary_md_has_the_measurement_sections(tmp_path):
    paths = summary.write_run_outputs(tmp_path, pd.DataFrame([BF16, NF4]))
    text = paths["summary"].read_text()
    assert "## Quantization damage before fine-tuning" in text
    assert "## Why a 4-bit base is not 4x smaller" in text
    assert "weight error, mean (%)" in text


def test_peak_memory_table_has_every_source_and_missing_ones_stay_missing():
    records = [
        row("nf4", **{"memory.all_phases.torch_allocated_peak_bytes": 100 * MiB, "memory.all_phases.rss_peak_bytes": 900 * MiB,
                      "memory.train.torch_allocated_peak_bytes": 80 * MiB, "memory.all_phases.nvml_process_peak_bytes": None,
                      "weights.load.base_bytes": 2 * MiB}),
    ]
    overall = tables.peak_memory_table(pd.DataFrame(records))
    assert list(overall.columns) == ["NVML process MiB", "NVML device MiB", "torch allocated MiB", "torch reserved MiB",
                                     "PSS MiB", "PSS as forked MiB", "RSS MiB", "base weights MiB"]
    assert pd.isna(overall.loc["nf4", "PSS MiB"])  # a record from before PSS: missing, not zero
    assert overall.loc["nf4", "torch allocated MiB"] == pytest.approx(100.0)
    assert pd.isna(overall.loc["nf4", "NVML process MiB"]) and pd.isna(overall.loc["nf4", "torch reserved MiB"])
    assert tables.peak_memory_table(pd.DataFrame(records), phase="train").loc["nf4", "torch allocated MiB"] == pytest.approx(80.0)


def test_qbench_report_shows_the_damage_and_the_explanation():
    shown = {s.key: s for s in write.report_sections(pd.DataFrame([BF16, NF4]))}
    assert shown["damage"].table.loc["nf4", "Δ mean recall@1 vs bf16 before training (points) [95 % interval]"] == "-6.00"
    assert "**nf4**: the base takes 690.4 KiB" in shown["weight_bytes"].text


def test_on_a_cpu_the_relative_table_and_the_plots_use_the_tree_pss_not_the_rss():
    from qbench.analysis import stats
    from qbench.contract import fields, schema

    records = [
        row("bf16", **{"memory.all_phases.pss_peak_bytes": 400 * MiB, "memory.all_phases.rss_peak_bytes": 1100 * MiB, "weights.load.base_bytes": 4 * MiB}),
        row("nf4", **{"memory.all_phases.pss_peak_bytes": 300 * MiB, "memory.all_phases.rss_peak_bytes": 1100 * MiB, "weights.load.base_bytes": 1 * MiB}),
    ]
    frame = pd.DataFrame(records)
    assert fields.first_present(frame, fields.HEADLINE_PEAK_MEMORY) == "memory.all_phases.pss_peak_bytes"
    relative = stats.relative_to_baseline(frame)
    assert relative.loc["nf4", "peak PSS vs bf16 (% smaller)"] == pytest.approx(25.0)
    assert schema.PHASE_MEMORY_PREFERENCE.index("pss_peak_bytes") < schema.PHASE_MEMORY_PREFERENCE.index("rss_peak_bytes")
    older = frame.drop(columns=["memory.all_phases.pss_peak_bytes"])  # records from before PSS was measured
    assert fields.first_present(older, fields.HEADLINE_PEAK_MEMORY) == "memory.all_phases.rss_peak_bytes"
