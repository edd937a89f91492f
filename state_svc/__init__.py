"""The state service: stored responses, conversations, background jobs and compaction summaries
behind the gRPC contract ``respgw.state.v1`` (``protos/respgw/state/v1``).

Package map::

    server.py         ``respgw state``: opens the backend, serves the servicer, sweeps expired rows
    config.py         StateSettings (flags and RESPGW_STATE_* variables)
    service.py        the StateService servicer: each RPC, from its checked request to its answer
    checks.py         what a request must be (string sizes and bytes, required fields, JSON
                      objects, unique ids), incoming messages as the backend's dataclasses
    records.py        outgoing messages: stored turns, items, conversations, compactions, jobs;
                      a call status
    page_tokens.py    the conversation listing's page tokens
    wire.py           a large PutTurn read without copying its large fields
    long_json.py      a large response JSON checked without parsing its long strings
    errors.py         the error tree (one class per status code, reasons from ``ErrorReason``)
                      and its constructors; one boundary maps them to statuses for every RPC
    backends/         storage behind one ``typing.Protocol``, chosen by ``--backend``:
      base.py         the Backend protocol, its dataclasses and shared rules
      sqlite.py       one file in WAL mode (the default)
      postgres.py     asyncpg, for replicas sharing one database
      memory.py       tests and development

It imports ``gateway`` (plumbing) and the generated ``respgw`` code, never another service.
"""
