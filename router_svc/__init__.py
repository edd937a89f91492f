"""The router: the Responses and Conversations API over HTTP, in front of the hub.

Package map (a request's way through it, top to bottom)::

    app.py            the ASGI app, its middleware, the HTTP protocol guard, ``respgw router``
    config.py         RouterSettings (flags and RESPGW_* variables)
    services.py       what a handler needs, built once per process (clients, caches, settings)
    auth.py           API keys to tenants
    http.py           JSON in and out, query parameters, ids in paths
    routes/           one module per API area: responses, conversations, containers, passthrough
    validate.py       POST /v1/responses bodies parsed into a TurnRequest, as OpenAI checks them
    inputs.py         input items normalized into stored items (one table row per item type)
    checks.py         the JSON checker: values checked in OpenAI's words (param, message, code)
    vocabulary.py     the API's words: request fields, include values, tool and item types
    turn.py           one turn: history, stateful tools, the hub call, the stored result
    streaming.py      a streamed turn: the hub read by a task, events held until stored, SSE out
    idempotency.py    retries: an Idempotency-Key's or an SDK retry's identity, its first attempt
    background.py     background responses: accepted, cancelled, followed (the routes' side)
    background_worker.py  the worker: the jobs this router runs, the scanner that claims others'
    background_run.py     one attempt at a job under its lease: renew, call the hub, log, finish
    background_log.py     a job's event log: numbered across attempts, streamed, followed
    background_spec.py    a job's spec: what another router needs to run the turn
    tool_loop.py      the tool loop for code_interpreter and shell on a chat hub: whether, rounds
    tool_calls.py     what the loop's rounds share (offers, requests, limits); one call run
    tool_stream.py    the streamed tool loop: one event sequence over hub calls and calls run
    tool_items.py     those tools' items and the model's text of a result; replay to a chat hub
    dialects/         the hub's API, one module each, chosen once by --hub-api (``svc.dialect``):
      chat/           a Chat Completions hub (``ChatDialect`` in its ``__init__.py``):
        request.py    a turn as the hub request, and what a chat hub cannot take
        messages.py   Responses items as chat messages
        tools.py      the declared tools offered as functions, the hub's calls read back
        result.py     a whole chat completion as the Response object
        stream.py     a streamed chat completion's chunks as Responses events
      responses.py    a Responses API hub, used statelessly: the same three, passed through
    shapes.py         the JSON shapes passed around, as types: ResponseObject, Item, StreamEvent
    response.py       the Response object and its output items, whichever dialect answered
    events.py         streaming events: numbering, SSE encoding, the translators' shared base
    event_log.py      a streamed turn's stored event log, compact (delta runs), and expanded
    replay.py         a stored response's event stream: its stored log, or rebuilt
    hub.py            the client of the hub (the model server)
    state_client.py   the typed client of the state service (respgw.state.v1): a method per RPC
    state_records.py  the state records the router builds and reads (the only proto conversion)
    history_cache.py  histories of chains this router stored, so a chained turn reads none
    bootstrap.py      the client of BootstrapService (respgw.bootstrap.v1), or the no-op
    execution.py      the client of ExecutionService (runs tool calls, serves containers)
    errors.py         the error tree, and where errors become OpenAI-shaped responses
    ids.py            OpenAI-style object ids

It imports ``gateway`` (plumbing) and the generated ``respgw`` code, never another service.
"""
