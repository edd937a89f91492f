"""``python -m gateway`` is the ``respgw`` command."""

from gateway.cli import main

main()
