"""qbench's `eval.protocol = "rolling"` beside lm-evaluation-harness's `loglikelihood_rolling`, on the same text and the
same model object: summed NLL, scored tokens and perplexity of both, and their relative difference.

lm_eval is not a dependency of qbench; run this with a Python that has it and sees qbench, without touching the
environment qbench runs in, e.g.:

    python -m venv --system-site-packages /tmp/lm-eval-venv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" > /tmp/lm-eval-venv/lib/python3.11/site-packages/qbench-env.pth
    /tmp/lm-eval-venv/bin/pip install --no-deps lm_eval
    PYTHONPATH=. /tmp/lm-eval-venv/bin/python scripts/check_lm_eval_rolling.py --model builtin:tiny-llama --window 64

Exits 0 when the perplexities differ by at most --tolerance (relative; default 0.01 %), 1 otherwise, 2 without lm_eval.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

SUITE = """
name = "lm-eval-rolling"
task = "causal_lm"
compute_dtype = "{dtype}"
[model]
id = "{model}"
[data]
kind = "builtin"
name = "{data}"
[lora]
target_modules = ["q_proj"]
[train]
steps = 0
lr = 1e-3
[eval]
window = {window}
batch_size = {batch}
protocol = "rolling"
{max_windows}
"""
DENSE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def qbench_rolling(args: argparse.Namespace):
    """(model, tokenizer, eval text, qbench's summed NLL, scored tokens, perplexity)."""
    from transformers import AutoModelForCausalLM

    from qbench.cell import models
    from qbench.cell.tasks import get_task
    from qbench.cell.tasks.causal_lm import evaluate_perplexity, load_texts
    from qbench.contract import precisions
    from qbench.contract.suite import LoadedSuite, parse

    text = SUITE.format(dtype=args.dtype, model=args.model, data=args.data, window=args.window, batch=args.batch,
                        max_windows="")
    loaded = LoadedSuite(parse(text, "check.toml"), Path("check.toml").resolve(), "0" * 64, text)
    path = models.resolve(args.model)
    task = get_task(loaded, path, "cpu")
    task.prepare_data()
    model = models.load_base(AutoModelForCausalLM, path, precisions.get(DENSE[args.dtype]), args.dtype, "cpu", loaded.suite.model)
    model.eval()
    evaluation = evaluate_perplexity(model, task.windows, task.eval_bytes, args.batch, "cpu", task.window_bytes)
    nll = sum(evaluation.per_window["window_nll"])
    _, eval_text, _ = load_texts(loaded)
    return model, task.tokenizer, eval_text, nll, task.windows.scored_tokens, evaluation.metrics["perplexity"]


def lm_eval_rolling(model, tokenizer, text: str, window: int, batch: int, softmax_dtype: str | None) -> tuple[float, int]:
    """(summed NLL, scored tokens) from lm-evaluation-harness's HFLM.loglikelihood_rolling over `text` as one document."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=window, batch_size=batch, device="cpu",
              softmax_dtype=softmax_dtype)
    (loglikelihood,) = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True)
    return -loglikelihood, len(lm.tok_encode(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama", help="a causal LM qbench can load (builtin:smollm2-135m once converted)")
    parser.add_argument("--data", default="pydoc", help="builtin text corpus whose held-out part is scored")
    parser.add_argument("--window", type=int, default=64, help="tokens per window (lm-eval's max_length)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=tuple(DENSE), default="float32")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference of the perplexities")
    parser.add_argument("--softmax-dtype", default="float32",
                        help="lm-eval's softmax_dtype: float32 scores as qbench does (a float32 log-softmax of the logits); "
                             "'model' keeps lm-eval's default, the model's dtype, whose bf16 sums round each window's NLL")
    args = parser.parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm_eval is not installed in this Python (see this script's docstring)", file=sys.stderr)
        return 2
    model, tokenizer, text, ours_nll, ours_tokens, ours_ppl = qbench_rolling(args)
    softmax = None if args.softmax_dtype == "model" else args.softmax_dtype
    theirs_nll, theirs_tokens = lm_eval_rolling(model, tokenizer, text, args.window, args.batch, softmax)
    theirs_ppl = math.exp(theirs_nll / theirs_tokens)
    difference = abs(ours_ppl - theirs_ppl) / theirs_ppl
    print(f"model {args.model} ({args.dtype}), builtin:{args.data} held-out text, window {args.window}")
    print(f"qbench eval.protocol = rolling: NLL {ours_nll:.6f} over {ours_tokens} tokens, perplexity {ours_ppl:.6f}")
    print(f"lm-eval loglikelihood_rolling (softmax_dtype {args.softmax_dtype}):  NLL {theirs_nll:.6f} over {theirs_tokens} tokens, perplexity {theirs_ppl:.6f}")
    print(f"relative difference {difference:.2e} (tolerance {args.tolerance:.0e})")
    return 0 if ours_tokens == theirs_tokens and difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
