"""`python -m saekit ...` (used by `torchrun -m saekit`) is the same as the `saekit` command."""

from saekit_cli.main import main

main()
