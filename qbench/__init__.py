"""qbench: the same LoRA fine-tune under every weight format, measured side by side.

Layers, each importing only the ones below it (import-linter checks it; see pyproject.toml):

    cli                 the `qbench` command: argparse and rich only
    runner | analysis   the parent (plan, preflight, executors, resume) | records -> tables, reports, the gate
    zoo                 builtin checkpoints and the commands that build them
    cell                one cell's child process: tasks, data, measurement
    machine             what this machine is: versions, CPU, devices, threads
    contract            what every process agrees on: suite, registries, grid, protocol, record (no torch, no pandas)
"""

__version__ = "0.1.0"
