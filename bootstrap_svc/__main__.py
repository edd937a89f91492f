"""``python -m bootstrap_svc``: the reference bootstrap service, configured by flags and
RESPGW_BOOTSTRAP_* environment variables."""

from __future__ import annotations

import argparse

import uvloop

from bootstrap_svc import server
from bootstrap_svc.config import BootstrapSettings
from gateway import settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap_svc", description="The reference bootstrap service."
    )
    settings.add_arguments(parser, BootstrapSettings)
    args = parser.parse_args(argv)
    uvloop.run(server.run(settings.from_namespace(BootstrapSettings, args)))


if __name__ == "__main__":
    main()
