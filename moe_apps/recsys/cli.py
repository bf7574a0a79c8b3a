"""`moe-apps recsys`: multi-task recommendation on MovieLens (train / eval / recommend)."""

import typer

app = typer.Typer(help="Multi-task recommendation on MovieLens (MMoE, PLE).", no_args_is_help=True)
