"""The vision commands README.md shows are real: each parses against the `moe-apps` CLI (every
option exists and takes what it is given), and the presets and models it names exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from moe_apps.cli import app
from moe_apps.vision.config import MODELS, PRESETS

README = Path(__file__).resolve().parents[3] / "README.md"


def _vision_commands() -> list[list[str]]:
    section = README.read_text().split("## Vision: CIFAR-10 with conv experts", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines() if line.strip()]


def test_readme_vision_commands_parse() -> None:
    commands = _vision_commands()
    assert len(commands) >= 6 and {c[1] for c in commands} == {"train", "eval", "predict"}
    root = typer.main.get_command(app)
    for args in commands:
        assert args[0] == "vision", args
        root_ctx = root.make_context("moe-apps", list(args), resilient_parsing=True)
        group = root.get_command(root_ctx, "vision")
        group_ctx = group.make_context("vision", list(args[1:]), parent=root_ctx, resilient_parsing=True)
        command = group.get_command(group_ctx, args[1])
        assert command is not None, args
        context = command.make_context(args[1], list(args[2:]), parent=group_ctx)  # raises on a bad option
        params = context.params
        if args[1] == "train":
            assert params["preset"] in PRESETS
            assert params["model"] is None or params["model"] in MODELS
