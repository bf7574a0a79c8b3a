"""Every runnable example in examples/ trains: its loss goes down meaningfully in a few dozen steps,
through moe_core layers whose parameters (routers and gates included) all learn.

Parametrized over the files in examples/ (a new example is picked up automatically; files starting
with ``_`` are helpers, not examples: ``_common.py`` holds their shared training loop). Each example
exposes ``main(steps, seed=0) -> (first, last)`` and an argparse entry point; both are exercised
here.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))

STEPS = {"hierarchical": 100}  # steps per example (default 40): enough for a clear drop
MAX_RATIO = 0.7  # the held-out loss after those steps must be below this fraction of the first


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples import their shared helpers with ``from _common import ...``, which works when
    the examples folder is on ``sys.path`` (as it is for ``python examples/NAME.py``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def moe_core_parameters() -> Iterator[dict[int, tuple[str, nn.Parameter, Tensor]]]:
    """While open, every moe_core module that runs a forward pass records its parameters, as
    ``id(parameter) -> (name, parameter, its value at that first forward)``."""
    seen: dict[int, tuple[str, nn.Parameter, Tensor]] = {}

    def record(module: nn.Module, args: object, output: object) -> None:
        if type(module).__module__.startswith("moe_core."):
            for name, param in module.named_parameters(prefix=type(module).__name__):
                seen.setdefault(id(param), (name, param, param.detach().clone()))

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_its_moe(path: Path) -> None:
    module = _load(path)
    assert module.__doc__ and module.__doc__.strip(), f"{path.name} needs a module docstring"
    params = inspect.signature(module.main).parameters
    assert list(params)[:2] == ["steps", "seed"] and params["seed"].default == 0
    steps = STEPS.get(path.stem, 40)
    with moe_core_parameters() as moe_params:
        first, last = module.main(steps)
    assert math.isfinite(first) and math.isfinite(last), (first, last)
    assert last < MAX_RATIO * first, f"{path.stem}: loss {first:.4f} -> {last:.4f} after {steps} steps"
    assert moe_params, f"{path.stem} never runs a moe_core layer"
    frozen = [name for name, param, start in moe_params.values() if torch.equal(param, start)]
    assert not frozen, f"{path.stem}: these moe_core parameters never changed: {frozen}"
    assert module.main(steps) == (first, last), f"{path.stem} is not deterministic for a seed"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_command_line(path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [str(path), "--steps", "2", "--seed", "1"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == ["step 0", "step 2"], out
    assert not re.search(r"\b(nan|inf)\b", out), out
