"""Harness overhead: the same tiny LoRA fine-tune as a bare hand-written loop and through qbench's
train() with every tracker on (the memory sampler process, the step timer, the per-step callback).

    python -m pytest benchmarks/test_overhead.py -s          # prints the figures
    QBENCH_OVERHEAD_ROUNDS=60 QBENCH_OVERHEAD_STEPS=40 ...   # longer, steadier (default 30 x 40)
    QBENCH_OVERHEAD_TOLERANCE=0.01                           # the most overhead allowed (default 1 %)
    QBENCH_OVERHEAD_THREADS=1                                # torch threads (default 1)

Rounds interleave the two loops (bare-qbench, then qbench-bare, ...) so that a machine getting
busier or quieter affects both alike. Each loop starts from the same LoRA weights and consumes the
same precomputed batches, so the difference is the harness alone. Step time is from fetching the
first batch to `zero_grad`; throughput is samples over the wall seconds of the timed steps, for
both loops alike. The CPU time per step (this process's, all threads) is shown beside it: on a busy
machine it says what the harness costs where wall time mostly says what the machine's load was.
"""

from __future__ import annotations

import os
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

ROUNDS = int(os.environ.get("QBENCH_OVERHEAD_ROUNDS", "30"))
STEPS = int(os.environ.get("QBENCH_OVERHEAD_STEPS", "40"))
UNTIMED = 5
BATCH = 16
TOLERANCE = float(os.environ.get("QBENCH_OVERHEAD_TOLERANCE", "0.01"))  # issue 12: within 1 % of the bare loop
# one thread by default: on a shared, oversubscribed CPU two OpenMP threads wait on each other and a
# tiny step's time is mostly scheduling noise
THREADS = int(os.environ.get("QBENCH_OVERHEAD_THREADS", "1"))
CONFIG = SimpleNamespace(
    steps=STEPS, lr=1e-3, weight_decay=0.0, scheduler="cosine", warmup_steps=2, grad_accum=1, max_grad_norm=1.0
)


def tiny_clip_with_lora():
    """A random tiny CLIPModel (as the builtin one is shaped) with LoRA on the attention projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=3, bos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=64,
    )
    model = CLIPModel(config).requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    return model


def make_batches(count: int) -> list:
    from qbench.cell.tasks.batch import Batch

    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(4, 64, (BATCH, 12), generator=generator)
        ids[:, 0], ids[:, -1] = 2, 3
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator)}
        batches.append(Batch(inputs, samples=BATCH, tokens=int(ids.numel())))
    return batches


def clip_loss(model, batch):
    from qbench.cell.tasks.metrics import contrastive_loss

    outputs = model(**batch.inputs, return_loss=False)
    return contrastive_loss(outputs.logits_per_image, outputs.logits_per_text)


def bare_loop(model, batches) -> dict:
    """What a person writes by hand: no timer object, no callback, no tracker, no loss read-back."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=CONFIG.lr, weight_decay=CONFIG.weight_decay)
    scheduler = get_scheduler(CONFIG.scheduler, optimizer, num_warmup_steps=CONFIG.warmup_steps, num_training_steps=STEPS)
    model.train()
    stream = iter(batches)
    step_seconds, step_cpu_seconds, samples, first_start = [], [], 0, None
    for step in range(STEPS):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = next(stream)
        loss = clip_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CONFIG.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        end, cpu_end = time.perf_counter(), time.process_time()
        if step >= UNTIMED:
            first_start = first_start if first_start is not None else start
            step_seconds.append(end - start)
            step_cpu_seconds.append(cpu_end - cpu_start)
            samples += batch.samples
    return {"step_seconds": step_seconds, "step_cpu_seconds": step_cpu_seconds, "samples": samples, "wall_s": end - first_start}


def qbench_loop(model, batches) -> dict:
    """qbench's train() inside a MemoryTracker phase (sampler process running), timed by its StepTimer."""
    from qbench.cell.measure.memory import MemoryTracker
    from qbench.cell.measure.timing import StepTimer
    from qbench.cell.train import train

    timer = StepTimer(UNTIMED)
    tracker = MemoryTracker("cpu")
    events = []
    try:
        with tracker.phase("train"):
            train(model, iter(batches), clip_loss, CONFIG, timer, on_step=lambda step, loss: events.append((step, loss)))
    finally:
        tracker.close()
    assert len(events) == STEPS and tracker.record["memory.train.samples"] > 0  # the trackers really ran
    return {"step_seconds": list(timer.step_seconds), "step_cpu_seconds": list(timer.step_cpu_seconds), "samples": timer.samples,
            "wall_s": timer.summary()["speed.timed_wall_s"]}


def test_qbench_train_overhead_against_a_bare_loop(benchmark):
    torch.set_num_threads(THREADS)
    model = tiny_clip_with_lora()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = make_batches(STEPS)
    runs: dict[str, list[dict]] = {"bare": [], "qbench": []}
    round_number = [0]

    def reset() -> None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in initial:
                    parameter.copy_(initial[name])
                    parameter.grad = None
        torch.manual_seed(0)  # the same dropout masks in both loops

    def one_round() -> None:
        order = ("bare", "qbench") if round_number[0] % 2 == 0 else ("qbench", "bare")
        round_number[0] += 1
        for which in order:
            reset()
            runs[which].append((bare_loop if which == "bare" else qbench_loop)(model, batches))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for which in runs:
        runs[which] = runs[which][-ROUNDS:]  # the warm-up round is not counted

    def pooled(which: str) -> tuple[float, float]:
        steps = [s for run in runs[which] for s in run["step_seconds"]]
        return statistics.median(steps), sum(r["samples"] for r in runs[which]) / sum(r["wall_s"] for r in runs[which])

    bare_p50, bare_rate = pooled("bare")
    qbench_p50, qbench_rate = pooled("qbench")
    # the CPU this process spent per step: what a busy machine hardly moves (the sampler's own CPU is its
    # process's, not counted here; on a quiet machine it runs on another core)
    bare_cpu, qbench_cpu = (statistics.median(s for run in runs[w] for s in run["step_cpu_seconds"]) for w in ("bare", "qbench"))
    paired_step = statistics.median(
        statistics.median(q["step_seconds"]) / statistics.median(b["step_seconds"]) for b, q in zip(runs["bare"], runs["qbench"], strict=True)
    )
    paired_rate = statistics.median(
        (q["samples"] / q["wall_s"]) / (b["samples"] / b["wall_s"]) for b, q in zip(runs["bare"], runs["qbench"], strict=True)
    )
    figures = {
        "rounds": ROUNDS, "timed_steps_per_loop": STEPS - UNTIMED, "batch": BATCH, "threads": torch.get_num_threads(),
        "bare_step_p50_s": bare_p50, "qbench_step_p50_s": qbench_p50, "step_p50_ratio": qbench_p50 / bare_p50,
        "bare_samples_per_s": bare_rate, "qbench_samples_per_s": qbench_rate, "samples_per_s_ratio": qbench_rate / bare_rate,
        "paired_step_p50_ratio_median": paired_step, "paired_samples_per_s_ratio_median": paired_rate,
        "bare_step_cpu_p50_s": bare_cpu, "qbench_step_cpu_p50_s": qbench_cpu, "step_cpu_p50_ratio": qbench_cpu / bare_cpu,
    }
    benchmark.extra_info.update(figures)
    lines = [f"{k:36s} {v:.6g}" if isinstance(v, float) else f"{k:36s} {v}" for k, v in figures.items()]
    print("\nqbench harness overhead (pooled over interleaved rounds)\n" + "\n".join(lines))
    assert bare_rate > 0 and qbench_rate > 0
    if benchmark.disabled:  # a smoke run (.ci/run, shared CPU): the 1 % target is judged only when benchmarking
        return
    # overhead is one-sided: qbench coming out faster than the bare loop is the machine's noise, shown in the figures
    assert qbench_p50 / bare_p50 - 1 <= TOLERANCE, f"median step time {qbench_p50 / bare_p50 - 1:+.2%} vs the bare loop"
    assert 1 - qbench_rate / bare_rate <= TOLERANCE, f"samples/s {qbench_rate / bare_rate - 1:+.2%} vs the bare loop"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-s"]))
