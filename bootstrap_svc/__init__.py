"""The reference bootstrap service: BootstrapService and ExecutionService of
``respgw.bootstrap.v1`` (``protos/respgw/bootstrap/v1``), which other teams may implement in any
language instead (``examples/bootstrap-node``; ``tests/bootstrap_conformance`` checks either).

Package map::

    server.py          ``respgw bootstrap``: both servicers on one GrpcServer, the session sweeper
    config.py          BootstrapSettings (flags and RESPGW_BOOTSTRAP_* variables)
    service.py         the BootstrapService servicer: PrepareTools, ReleaseTools, capabilities
    execution.py       the ExecutionService servicer: calls, sessions and their files
    sessions.py        the session registry (SQLite in the work folder) and replay records
    executor.py        runs a call in its session's sandbox (one kernel per Python session)
    sandbox.py         the bubblewrap sandbox and its limits
    memwatch.py        the session memory bound: measures a sandbox's processes, freezes one
    sandbox_runner.py  the interpreter that runs INSIDE a sandbox (standard library only)
    files.py           a session's files: changes, sizes, client paths
    errors.py          the error tree (one class per status code, reasons from ``ErrorReason``)

Errors are the classes of ``errors.py``, built from the generated ``ErrorReason`` constants; one
boundary (``gateway.grpcerrors.servicer``) maps them to statuses for every RPC. It imports ``gateway`` and the generated ``respgw`` code, never another service.
"""
