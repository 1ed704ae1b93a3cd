"""`python -m xqcli`: the `xq` command."""

from xqcli.cli import main

main()
