"""Shared console output for the CLI: one rich console, the per-layer table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes keep whole rows


def print_layers(rows: Sequence[Any], teacher_params: int | None, params: int, params_without_head: int) -> None:
    """The per-layer compression table and the totals."""
    table = Table(title="Kronecker layers")
    columns = ["module", "before", "after", "params before", "params after", "init error"]
    calibrated = any(getattr(row, "output_error", None) is not None for row in rows)
    for column in columns + ["output error"] * calibrated:
        table.add_column(column, justify="right" if column.startswith(("params", "init", "output")) else "left")
    for row in rows:
        errors = [row.error] + [row.output_error] * calibrated
        sizes = f"{row.params_before:,}", f"{row.params_after:,}"
        table.add_row(row.path, row.before, row.after, *sizes, *("" if e is None else f"{e:.3f}" for e in errors))
    console.print(table)
    if teacher_params is not None:
        console.print(f"teacher parameters: {teacher_params:,}")
    console.print(f"parameters: {params:,} ({params_without_head:,} without an untied LM head, as the paper counts)")
