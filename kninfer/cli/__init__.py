"""The `kninfer` command: each submodule lists its commands; heavy imports stay inside them."""

from __future__ import annotations

import sys

import typer

from kninfer.errors import KninferError

app = typer.Typer(
    help="Compress GPT-2 models with Kronecker products, distil them, export to ONNX and run them on CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2."""
    from kninfer.cli import demo, export, model, pretrain, run, train

    for module in (model, pretrain, train, export, run, demo):
        for command in module.COMMANDS:
            app.command()(command)
    try:
        app()
    except KninferError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
