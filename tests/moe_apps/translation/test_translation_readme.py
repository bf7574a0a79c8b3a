"""The translation commands README.md shows are real: each parses against the `moe-apps` CLI
(every option exists and takes what it is given) and the presets, models, routers and splits it
names exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from moe_apps.cli import app
from moe_apps.datasets.registry import MULTI30K_OPTIONAL_SPLITS, MULTI30K_SPLITS
from moe_apps.translation.config import DIRECTIONS, MODELS, PRESETS, ROUTER_NAMES

README = Path(__file__).resolve().parents[3] / "README.md"


def _commands() -> list[list[str]]:
    section = README.read_text().split("## Translation: Multi30k", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines() if line.strip()]


def test_readme_translation_commands_parse() -> None:
    commands = _commands()
    assert len(commands) >= 8 and {c[1] for c in commands} == {"train", "eval", "translate"}
    root = typer.main.get_command(app)
    for args in commands:
        assert args[0] == "translation", args
        root_ctx = root.make_context("moe-apps", list(args), resilient_parsing=True)
        group = root.get_command(root_ctx, "translation")
        group_ctx = group.make_context("translation", list(args[1:]), parent=root_ctx, resilient_parsing=True)
        command = group.get_command(group_ctx, args[1])
        assert command is not None, args
        params = command.make_context(args[1], list(args[2:]), parent=group_ctx).params
        if args[1] == "train":
            assert params["preset"] in PRESETS
            assert params["model"] in (None, *MODELS) and params["router"] in (None, *ROUTER_NAMES)
            assert params["direction"] in (None, *DIRECTIONS)
        if args[1] == "eval":
            assert params["split"] in (None, *MULTI30K_SPLITS, *MULTI30K_OPTIONAL_SPLITS)
