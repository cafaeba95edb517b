"""LoRA inits, DoRA and merges in a cell: the suite keys, the checks before any cell, and what a cell records
(the initial error, the merged evaluations, the adapter it keeps) on the builtin tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbench.contract import grid, inits
from qbench.contract.protocol import CellSpec
from qbench.contract.schema import ON_REQUEST_PHASES, PHASES
from qbench.contract.suite import SuiteError, load, parse
from qbench.runner import preflight

from .conftest import write_suite
from .helpers import suites

SUITE = suites.causal_lm(
    precisions=None, name="inits", settings='compute_dtype = "float32"\nthreads = 1', steps=3,
    train="batch_size = 4\nlr = 5e-3\nmax_length = 64\nuntimed_steps = 1",
    lora='r = 8\nalpha = 16\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]',
    evaluation="batch_size = 16\nwindow = 64\nmax_windows = 8\nafter_merge = true", extra="[output]\nkeep_adapters = true\n",
)


def with_matrix(baseline: str, matrix: str) -> str:
    """SUITE with a [matrix] table and the baseline precision it needs."""
    return SUITE.replace("threads = 1", f'threads = 1\nbaseline = "{baseline}"') + "[matrix]\n" + matrix


def problems(text: str) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        parse(text, "s.toml")
    return caught.value.problems


def test_the_default_init_is_peft_s_own_default():
    suite = parse(SUITE, "s.toml")
    assert suite.lora.init == inits.DEFAULT == "kaiming" and inits.get("kaiming").peft_value is True
    assert suite.lora.use_dora is False and suite.eval.after_merge == ("dequantized", "requantized")
    assert parse(SUITE.replace("after_merge = true", 'after_merge = ["requantized"]'), "s").eval.after_merge == ("requantized",)
    assert parse(SUITE.replace("after_merge = true", "after_merge = false"), "s").eval.after_merge == ()


def test_bad_lora_settings_get_one_line_each():
    assert problems(SUITE.replace('dropout = 0.0', 'dropout = 0.0\ninit = "pisa"')) == [
        "lora.init: unknown LoRA init(s) 'pisa' (did you mean 'pissa'?); known: kaiming, gaussian, pissa, olora, corda, "
        "loftq, eva (got 'pisa')"]
    assert problems(SUITE.replace("after_merge = true", 'after_merge = ["requantised"]'))[0].startswith("eval.after_merge.0: ")
    assert problems(SUITE.replace("dropout = 0.0", "dropout = 0.0\nmerge = true")) == [
        "lora.merge: unknown key (qbench sets that with eval.after_merge)"]
    loftq_fp4 = with_matrix("nf4", 'precisions = ["nf4", "fp4"]\nlora_inits = ["kaiming", "loftq"]\n')
    assert problems(loftq_fp4) == [
        "matrix.lora_inits: 'loftq' cannot run here: peft's loftq fits the adapter to nf4, nf4-dq, int8 only, not to "
        "fp4 (leave it out, or drop those cells with matrix.exclude)"]
    excluded = loftq_fp4 + 'exclude = [{precision = "fp4", lora_init = "loftq"}]\n'
    assert [c.id for c in load_cells(excluded)] == ["nf4-kaiming-seed0", "nf4-loftq-seed0", "fp4-kaiming-seed0"]
    clip = SUITE.replace('task = "causal_lm"', 'task = "clip"').replace('dropout = 0.0', 'dropout = 0.0\ninit = "eva"')
    assert any("'eva' cannot run here: eva reads calibration batches of a causal_lm task, not clip" in p for p in problems(clip))


def load_cells(text: str) -> list:
    return grid.cells(parse(text, "s.toml"))


def test_inits_and_dora_are_axes_named_in_cell_ids():
    cells = load_cells(with_matrix("nf4-dq", 'precisions = ["nf4-dq"]\nlora_inits = ["gaussian", "pissa"]\nuse_dora = [false, true]\n'))
    assert [c.id for c in cells] == ["nf4-dq-gaussian-nodora-seed0", "nf4-dq-gaussian-dora-seed0", "nf4-dq-pissa-nodora-seed0",
                                     "nf4-dq-pissa-dora-seed0"]
    assert cells[3].record_fields().items() >= {"config.lora.init": "pissa", "config.lora.use_dora": True}.items()


def test_settings_that_cannot_run_on_this_device_or_model_are_refused_before_any_cell():
    on_cpu = parse(with_matrix("nf4", 'precisions = ["nf4", "int8"]\nlora_inits = ["loftq"]\nuse_dora = [false, true]\n'), "s")
    found = preflight.lora_world_problems(on_cpu, "cpu")
    assert found == [
        "matrix.lora_inits: 'loftq' cannot run here: peft computes loftq on CUDA or XPU only, not on cpu (leave it out, "
        "or drop those cells with matrix.exclude)",
        "matrix.use_dora: DoRA with precision 'int8': peft's DoRA on bitsandbytes' LLM.int8 layers fails on a CPU (the "
        "first training pass after an evaluation raises in bitsandbytes' int8 matmul) (leave it out, or drop those cells "
        "with matrix.exclude)"]
    assert preflight.lora_world_problems(on_cpu, "cuda") == []
    dora = parse(SUITE.replace("dropout = 0.0", "dropout = 0.0\nuse_dora = true"), "s")
    assert preflight.lora_world_problems(dora, None, {"encoder.q_proj": "MultiheadAttention"}) == [
        "lora.use_dora: lora.target_modules 'q_proj' names MultiheadAttention modules, which peft cannot give a DoRA "
        "adapter; target other layers, or use_dora = false"]
    pissa = parse(SUITE.replace("dropout = 0.0", 'dropout = 0.0\ninit = "pissa"'), "s")

    class Stored:
        quantization_config = {"quant_method": "gptq"}

    assert preflight.lora_world_problems(pissa, None, {}, Stored()) == [
        "lora.init: 'pissa' decomposes the checkpoint's full-precision weights, and builtin:tiny-llama is stored "
        "quantized (gptq, config.json quantization_config): give a full-precision checkpoint of the model"]


def run_cells(tmp_path: Path, text: str) -> dict[str, dict]:
    """Every cell of the suite run in this process, into tmp_path/run/cells."""
    from qbench.cell import pipeline

    loaded = load(write_suite(tmp_path, text))
    records = {}
    for cell in loaded.cells():
        spec = CellSpec(suite_text=loaded.text, suite_path=str(loaded.path), suite_sha256=loaded.sha256, run_id="t",
                        cell_id=cell.id, precision=cell.precision, seed=cell.seed, device="cpu",
                        record_path=str(tmp_path / "run" / "cells" / f"{cell.id}.json"), axes=dict(cell.axes))
        records[cell.id] = pipeline.run_cell(spec)
    return records


@pytest.fixture(scope="module")
def inits_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inits")
    text = with_matrix("dense", 'precisions = ["dense", "nf4"]\nlora_inits = ["kaiming", "pissa"]\n')
    return folder, run_cells(folder, text)


def test_each_cell_records_its_initial_error_against_the_plain_quantized_base(inits_run):
    _, records = inits_run
    assert all(r["status"] == "ok" for r in records.values()), {k: r.get("error") for k, r in records.items()}
    plain = records["nf4-kaiming-seed0"]
    # B = 0: the initialised layer is the quantized base, stored exactly as loading W into NF4 stores it
    assert plain["lora_init.error_rel_overall"] == plain["lora_init.plain_error_rel_overall"] > 0.01
    assert plain["lora_init.recovered_share"] == 0.0 and plain["lora_init.layers"] == 8
    assert plain["per_layer.lora_modules"][0] == "model.layers.0.self_attn.q_proj"
    pissa = records["nf4-pissa-seed0"]
    assert pissa["lora_init.plain_error_rel_overall"] == plain["lora_init.plain_error_rel_overall"]
    assert pissa["lora_init.error_rel_overall"] < 0.9 * pissa["lora_init.plain_error_rel_overall"]
    assert pissa["lora_init.rewrites_base"] is True and "rewritten base" in pissa["lora_init.base"]
    assert records["dense-kaiming-seed0"]["lora_init.error_rel_overall"] == 0.0  # float32 holds the checkpoint exactly


def test_merged_evaluations_sit_beside_the_unmerged_one_with_a_verdict(inits_run):
    _, records = inits_run
    for record in records.values():
        for which in ("dequantized", "requantized"):
            assert record[f"quality.merge_{which}.perplexity"] > 1
            assert record[f"interval.merge_{which}.perplexity.low"] < record[f"quality.merge_{which}.perplexity"]
            assert record[f"merge.{which}.perplexity_verdict"] in ("identical", "no difference the eval can detect", "better", "worse")
            assert record[f"merge.{which}.how"]
            low, high = record[f"merge.{which}.perplexity_delta_low"], record[f"merge.{which}.perplexity_delta_high"]
            assert low <= record[f"merge.{which}.perplexity_delta"] <= high
        assert "merge.absent_reason" not in record
    nf4 = records["nf4-kaiming-seed0"]
    assert 0 < nf4["merge.requantized.unchanged_code_share"] < 1 and nf4["merge.requantized.layers"] == 8
    assert -1 <= nf4["merge.requantized.delta_correlation"] <= 1
    assert len(nf4["per_layer.merge_requantized_delta_rms_to_step"]) == 8


def test_init_and_merges_are_phases_of_their_own_outside_the_fine_tune_s_peak(inits_run):
    _, records = inits_run
    pissa = records["nf4-pissa-seed0"]
    assert pissa["time.init.wall_s"] > 0 and pissa["memory.init.rss_peak_bytes"] > 0
    assert pissa["memory.all_phases.excluded_phases"] == "init,merge_dequantized,merge_requantized"
    measured = [p for p in PHASES if p not in ON_REQUEST_PHASES]
    assert pissa["memory.all_phases.rss_peak_bytes"] == max(pissa[f"memory.{p}.rss_peak_bytes"] for p in measured)
    assert "time.init.wall_s" not in records["nf4-kaiming-seed0"]


def test_a_kept_adapter_loads_with_peft_and_scores_what_the_cell_scored(inits_run, tiny_llama_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from qbench.cell import models
    from qbench.cell.tasks import get_task
    from qbench.contract import precisions

    folder, records = inits_run
    loaded = load(folder / "suite.toml")
    for cell_id, precision in (("nf4-kaiming-seed0", "nf4"), ("dense-pissa-seed0", "fp32")):
        record = records[cell_id]
        kept = Path(record["adapter.kept_path"])
        assert kept == folder / "run" / "adapters" / cell_id and (kept / "adapter_config.json").is_file()
        assert record["weights.adapter_bytes"] == (kept / "adapter_model.safetensors").stat().st_size
        task = get_task(loaded, tiny_llama_path, "cpu")
        task.prepare_data()
        # the original checkpoint, as a user has it: a pissa adapter comes converted for it
        base = models.load_base(task.model_class, tiny_llama_path, precisions.get(precision), "float32", "cpu", loaded.suite.model)
        models.disable_bnb_cpu_weight_packing(base)
        score = task.evaluate(PeftModel.from_pretrained(base, str(kept))).metrics["perplexity"]
        assert score == pytest.approx(record["quality.eval_after.perplexity"], rel=1e-4)
    assert records["dense-pissa-seed0"]["adapter.converted"] is True
    # the converted adapter carries -B0, A0 beside the trained halves: every arm started from the same B0, A0
    halves = [load_file(records[c]["adapter.kept_path"] + "/adapter_model.safetensors") for c in ("dense-pissa-seed0", "nf4-pissa-seed0")]
    key = next(k for k in halves[0] if "lora_A" in k)
    assert torch.equal(halves[0][key][8:], halves[1][key][8:]) and not torch.equal(halves[0][key][:8], halves[1][key][:8])


def cpu_loftq_init(weight, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """peft's loftq_init (utils/loftq_utils.py) computed on the CPU: peft sends it to CUDA or XPU only."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.loftq_utils import _low_rank_decomposition

    original = weight.to(torch.float32)
    residual = original.clone()
    for step in range(num_iter):
        stored = bnb.nn.Params4bit(residual, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        dequantized = bnb.functional.dequantize_4bit(stored.data, stored.quant_state)
        decomposed = _low_rank_decomposition(original - dequantized, reduced_rank=reduced_rank)
        if step + 1 < num_iter:
            residual = original - decomposed["L"] @ decomposed["R"]
    return dequantized.to(weight.dtype), decomposed["R"], decomposed["L"]


def test_loftq_fits_the_adapter_to_what_nf4_lost(tmp_path, monkeypatch):
    """LoftQ's route through qbench (float32 decomposition, its Q loaded as the arm's nf4 base, the adapter on it),
    with peft's computation moved to the CPU, which peft itself does not do."""
    import peft.tuners.lora.layer

    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", cpu_loftq_init)
    text = with_matrix("nf4", 'precisions = ["nf4"]\nlora_inits = ["loftq"]\nlora_r = [8, 16]\n').replace(
        "after_merge = true", "after_merge = false")
    records = run_cells(tmp_path, text)  # lora.alpha = 16: scaling 2 at r = 8, 1 at r = 16
    for record in records.values():
        assert record["status"] == "ok", record.get("error")
        assert record["lora_init.route"] == "full-precision" and record["adapter.converted"] is False
        assert "LoftQ" in record["adapter.applies_to"] and record["merge.absent_reason"].startswith("not asked")
    # peft sets B·A to the rank-r SVD of W - Q and the layer scales it by alpha / r: at alpha = r, Q + B·A is closer
    # to W than NF4 alone; at alpha = 2r it overshoots by exactly W - Q, as far from W as the plain base
    fitted, overshot = records["nf4-r16-seed0"], records["nf4-r8-seed0"]
    assert fitted["lora_init.error_rel_overall"] < 0.95 * fitted["lora_init.plain_error_rel_overall"]
    assert overshot["lora_init.error_rel_overall"] == pytest.approx(overshot["lora_init.plain_error_rel_overall"], rel=1e-5)


def test_a_clip_cell_judges_its_merges_unpaired(tmp_path, tiny_clip_dir, tsv_data_dir):
    from .helpers import clip

    text = clip.suite(tiny_clip_dir, tsv_data_dir, precisions=("nf4",), name="clipmerge",
                      evaluation="batch_size = 64\nafter_merge = true", extra='[output]\nkeep_adapters = false\n').replace(
                          'task = "clip"', 'task = "clip"\nbaseline = "nf4"')
    record = run_cells(tmp_path, text)["nf4-seed0"]
    assert record["status"] == "ok", record.get("error")
    assert record["merge.verdict_method"].startswith("unpaired")
    for which in ("dequantized", "requantized"):
        assert 0 <= record[f"quality.merge_{which}.mean_recall@1"] <= 1
        assert record[f"merge.{which}.mean_recall@1_verdict"] in ("identical", "no difference the eval can detect", "better", "worse")
    assert record["merge.requantized.layers"] == record["params.lora_modules"]
