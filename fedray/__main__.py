"""`python -m fedray` is the `fedray` command."""

from fedray.cli import main

main()
