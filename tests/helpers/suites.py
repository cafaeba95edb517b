"""Suite texts for the tests, from one builder: `text()` writes every section in the order a suite file has them;
`causal_lm()` fills it for the builtin tiny Llama and its generated text, and `tests/helpers/clip.py`'s `suite()`
for the tiny CLIP. A test states only what it is about; every other setting is the same small default
everywhere, so a change of the suite format is made here once.
"""

from __future__ import annotations

from pathlib import Path

# the causal-LM defaults: a few steps of the builtin tiny Llama on its generated pydoc text
LM_TRAIN = "batch_size = 2\nlr = 1e-3\nmax_length = 32\nuntimed_steps = 1"
LM_LORA = 'r = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj"]'
LM_EVAL = "window = 64\nmax_windows = 6"


def text(
    task: str,
    model: Path | str,
    data: str,
    precisions: tuple[str, ...] | None,
    *,
    name: str,
    settings: str = "",
    steps: int | None,
    train: str,
    lora: str,
    evaluation: str | None,
    matrix: str = "",
    model_extra: str = "",
    data_extra: str = "",
    extra: str = "",
) -> str:
    """A suite file's text. `settings`: top-level keys after `task` (baseline, threads, compute_dtype ...); `data`:
    the [data] section's body; `steps` None leaves the steps to `train`; `evaluation` None leaves out [eval];
    `precisions` None leaves out [matrix] (for `extra` to give it), `matrix` adds lines to it (seeds, other axes);
    `extra` appends sections."""
    sections = f"[eval]\n{evaluation}\n" if evaluation is not None else ""
    if precisions is not None:
        sections += "[matrix]\nprecisions = [" + ", ".join(f'"{p}"' for p in precisions) + "]\n"
        sections += f"{matrix}\n" if matrix else ""
    lines = (
        f'name = "{name}"', f'task = "{task}"', settings, "[model]", f'id = "{model}"', model_extra, "[data]", data, data_extra,
        "[lora]", lora, "[train]", f"steps = {steps}" if steps is not None else "", train,
    )
    return "\n" + "\n".join(line for line in lines if line) + "\n" + sections + extra


def causal_lm(
    model: Path | str = "builtin:tiny-llama",
    data: dict[str, Path | str] | str | None = None,
    precisions: tuple[str, ...] | None = ("bf16", "nf4"),
    *,
    name: str = "lm",
    settings: str = "",
    steps: int | None = 2,
    train: str = LM_TRAIN,
    lora: str = LM_LORA,
    evaluation: str | None = LM_EVAL,
    matrix: str = "",
    model_extra: str = "",
    data_extra: str = "",
    extra: str = "",
) -> str:
    """Suite text for a causal_lm suite: over the builtin generated `pydoc` text, or `data` as text files
    ({"train": path, "eval": path}) or as the [data] section's own body."""
    if data is None:
        section = 'kind = "builtin"\nname = "pydoc"'
    elif isinstance(data, str):
        section = data
    else:
        section = f'kind = "text"\ntrain = "{data["train"]}"\neval = "{data["eval"]}"'
    return text(
        "causal_lm", model, section, precisions, name=name, settings=settings, steps=steps, train=train, lora=lora,
        evaluation=evaluation, matrix=matrix, model_extra=model_extra, data_extra=data_extra, extra=extra,
    )
