"""``python -m common.cli``: the ``emc`` command."""

from common.cli.main import main

main()
