"""``python -m respgw_cli`` is the ``respgw`` command."""

from respgw_cli.main import main

main()
