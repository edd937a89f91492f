"""``python -m state_svc``: runs the state service with flags and RESPGW_STATE_* variables."""

from __future__ import annotations

import argparse

import uvloop

from gateway import logs, settings
from state_svc import server
from state_svc.config import StateSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m state_svc", description="Runs the Responses Gateway state service."
    )
    settings.add_arguments(parser, StateSettings)
    config = settings.from_namespace(StateSettings, parser.parse_args(argv))
    logs.setup(config.log_level, config.log_format)
    uvloop.run(server.run(config))


if __name__ == "__main__":
    main()
