"""CLI commands for this area; listed in COMMANDS and registered by kninfer.cli.main."""

COMMANDS: list = []
