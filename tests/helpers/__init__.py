"""Test helpers: tiny assets built in temporary folders (tests need neither the network nor a GPU)."""


def load_script(name: str):
    """A developer script of scripts/ (e.g. `check_llm_finetune`) imported as a module, for the functions it defines."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
