"""The README's moe_core example runs as written, so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"README section {title!r} has no python block"
    return blocks[0]


def test_readme_moe_core_example_runs() -> None:
    namespace: dict = {}
    exec(compile(_section_code("Using moe_core"), str(README), "exec"), namespace)
    layer = namespace["layer"]
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text()
    assert "make test" in text and "make train" in text
    makefile = (README.parent / "Makefile").read_text()
    assert "recsys train" in makefile.split("train:", 1)[1]
    assert "make test" in (README.parent / ".ci" / "run").read_text()
