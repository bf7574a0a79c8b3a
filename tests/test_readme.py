"""The README and docs/ARCHITECTURE.md say what the tree does, so they cannot rot: the moe_core
example runs as written, the two set-up commands are the Makefile's, the versions are the pinned
ones, and the folder and file maps name what exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _section(title: str) -> str:
    return README.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _make_recipe(target: str) -> str:
    """The command lines of one Makefile target."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert match, f"the Makefile has no {target!r} target"
    return match.group(1)


def test_readme_moe_core_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _section("Using moe_core"), flags=re.S)
    assert blocks, "README section 'Using moe_core' has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    layer = namespace["layer"]
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_readme_set_up_commands_are_the_makefile_targets() -> None:
    commands = re.findall(r"^make (\w+)", _section("Set up and run"), flags=re.M)
    assert commands == ["train", "test"], commands
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train: setup$", makefile, flags=re.M)
    assert re.search(r"^test: setup$", makefile, flags=re.M)
    assert "bash scripts/setup_env.sh" in _make_recipe("setup")
    assert _make_recipe("train").rstrip().endswith("/moe-apps recsys train")
    assert "moe-apps data download movielens-100k" in _make_recipe("train")
    assert "-m pytest" in _make_recipe("test")
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_readme_versions_are_the_pinned_ones() -> None:
    constraints = (ROOT / "scripts" / "constraints.txt").read_text()
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", constraints, flags=re.M))
    text = " ".join(_section("Set up and run").split())
    for name in ("torch", "torchvision", "torchrec"):
        assert f"{name} {pins[name]}" in text, (name, pins[name])
    assert pins["fbgemm-gpu"] == pins["fbgemm-gpu-cpu"]
    assert f"fbgemm {pins['fbgemm-gpu']}" in text


def test_readme_layout_names_what_exists() -> None:
    rows = [line for line in _section("Layout").splitlines() if line.startswith("| ")][1:]
    assert rows
    for row in rows:
        _, folder, what = (cell.strip() for cell in row.strip("|").split("|"))
        base = ROOT / folder.strip("`")
        assert base.exists(), row
        for name in re.findall(r"`([\w/.]+\.(?:py|md))`", what):
            assert (base / name).exists() or (ROOT / name).exists(), (name, row)


def test_architecture_lists_every_moe_core_file() -> None:
    file_map = ARCHITECTURE.read_text().split("```", 2)[1]
    core = file_map.split("moe_core/", 1)[1].split("\nmoe_apps/", 1)[0]
    listed = re.findall(r"^  (\w+\.py) ", core, flags=re.M)
    on_disk = sorted(p.name for p in (ROOT / "moe_core").glob("*.py"))
    assert sorted(listed) == on_disk
