"""`moe-apps data`: list, inspect, download and verify the datasets the apps train on."""

import typer

app = typer.Typer(help="Datasets: list, info, download, verify.", no_args_is_help=True)
