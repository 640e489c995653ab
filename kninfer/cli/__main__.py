"""`python -m kninfer.cli`: the same as the `kninfer` command."""

from kninfer.cli import main

main()
