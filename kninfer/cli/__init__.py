"""The `kninfer` command: each submodule lists its commands; heavy imports stay inside them."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from kninfer.errors import KninferError

try:
    from typer._click.exceptions import ClickException  # typer 0.2x vendors click
except ImportError:  # older typer depends on click itself
    from click.exceptions import ClickException

app = typer.Typer(
    help="Compress GPT-2 and Llama-family models with Kronecker products, distil them, export to ONNX and run "
         "them on CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
MAX_SEED = 2**32 - 1  # numpy's seeds (Trainer seeds numpy, torch and random with the same number)
OverwriteOption = Annotated[bool, typer.Option(help="Write into an existing folder kninfer did not write (its "
                                                    "other files are kept), or replace such a file.")]
TRAINING_MODULES = {"torch", "transformers", "datasets", "onnx", "optimum", "accelerate", "safetensors", "scipy"}


def above_zero(value: float | None) -> float | None:
    """Option callback: refuse a value of 0 or less (a learning rate, a temperature, a number of epochs)."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value:g} is not above 0")
    return value


def check_output_file(path: Path) -> None:
    """Fail now, not after the work, when `path` cannot be written: a folder, or in a folder that refuses files."""
    if path.is_dir():
        raise KninferError(f"'{path}' is a folder: name a file for this output")
    folder = next(p for p in path.absolute().parents if p.is_dir())  # the write creates the missing ones
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise KninferError(f"cannot write '{path}': {error.strerror or error}") from None


def write_output(path: Path, text: str) -> None:
    """Write a command's text output atomically; a path that cannot be written is bad input."""
    from kninfer.atomic import write_text

    try:
        write_text(path, text)
    except OSError as error:
        raise KninferError(f"cannot write '{path}': {error.strerror or error}") from None


def main() -> None:
    """Entry point: bad input, a missing training extra or an unusable path become one line on stderr, exit 2."""
    _register_commands()
    args = sys.argv[1:] or ["--help"]  # bare `kninfer` shows the help
    try:
        code = app(args, standalone_mode=False)  # errors reach the handlers below, not click's usage box
    except KninferError as error:
        _fail(str(error))
    except ClickException as error:
        context = getattr(error, "ctx", None)
        _fail(f"{error.format_message()} (see '{context.command_path if context else 'kninfer'} --help')")
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in TRAINING_MODULES:
            raise
        _fail(f"'kninfer {args[0]}' needs the training extra: pip install \"kninfer[train]\"")
    except OSError as error:
        if error.filename is None:
            raise
        _fail(f"cannot read or write '{error.filename}': {error.strerror or error}")
    sys.exit(code or 0)  # a command returns None; typer.Exit(n) comes back as n


def _register_commands() -> None:
    """Add every submodule's commands to `app`, once (tests call main() many times in one process)."""
    from kninfer.cli import demo, export, model, pretrain, run, serve, train

    if not app.registered_commands:
        for module in (model, pretrain, train, export, run, serve, demo):
            for command in module.COMMANDS:
                app.command()(command)


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
