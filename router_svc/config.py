"""Settings of the router (flags and RESPGW_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import ServerSettings, option


@dataclass(frozen=True)
class RouterSettings(ServerSettings):
    host: str = option("127.0.0.1", "Address the HTTP server binds.", env="RESPGW_ROUTER_HOST")
    port: int = option(
        8080, "Port of the HTTP server (0 picks a free one).", env="RESPGW_ROUTER_PORT"
    )
    hub_url: str = option(
        "",
        "Base URL of the model server, up to and including /v1 "
        "(e.g. http://127.0.0.1:8000/v1 for vLLM, http://127.0.0.1:11434/v1 for Ollama). Required.",
        env="RESPGW_HUB_URL",
    )
    hub_api: str = option(
        "chat",
        "What the hub speaks: chat (Chat Completions, e.g. vLLM, SGLang, llama.cpp, Ollama) "
        "or responses (the Responses API, e.g. OpenAI).",
        env="RESPGW_HUB_API",
    )
    hub_api_key: str = option(
        "", "Bearer token sent to the hub; empty sends none.", env="RESPGW_HUB_API_KEY"
    )
    hub_timeout_s: float = option(
        0.0,
        "Seconds a hub call may take in all before the client gets a 504; 0 sets no total, so a "
        "long live stream is never cut while it keeps sending (the bounds below still apply).",
        env="RESPGW_HUB_TIMEOUT_S",
    )
    hub_connect_timeout_s: float = option(
        10.0, "Seconds to connect to the hub.", env="RESPGW_HUB_CONNECT_TIMEOUT_S"
    )
    hub_first_byte_timeout_s: float = option(
        300.0,
        "Seconds the hub may take to start its answer (queueing and prefill included); 0: none.",
        env="RESPGW_HUB_FIRST_BYTE_TIMEOUT_S",
    )
    hub_idle_timeout_s: float = option(
        120.0,
        "Seconds the hub may go quiet in the middle of an answer (between two events of a "
        "stream); 0: none.",
        env="RESPGW_HUB_IDLE_TIMEOUT_S",
    )
    default_model: str = option(
        "",
        "Model used when a request names none; empty makes model required.",
        env="RESPGW_DEFAULT_MODEL",
    )
    state_address: str = option(
        "127.0.0.1:50051",
        "gRPC target of the state service (dns:///state:50051 spreads calls "
        "over every replica a headless Service resolves to).",
        env="RESPGW_STATE_ADDRESS",
    )
    state_timeout_s: float = option(
        5.0, "Deadline of each state service call, in seconds.", env="RESPGW_STATE_TIMEOUT_S"
    )
    history_cache_mb: int = option(
        64,
        "Memory for the histories of the chains this router stored turns on, so that a turn "
        "chained on one of them needs no history call (the state service still checks the chain "
        "when the turn is stored); 0 turns the cache off.",
        env="RESPGW_HISTORY_CACHE_MB",
    )
    state_streams: int = option(
        2,
        "Exchange streams to the state service that carry the request path's calls (PutTurn, "
        "GetHistory, GetResponse) at a fraction of a unary call's CPU; 0 makes every call a "
        "unary RPC.",
        env="RESPGW_STATE_STREAMS",
    )
    bootstrap_address: str = option(
        "",
        "gRPC target of the bootstrap service; empty uses the built-in no-op, which prepares "
        "nothing.",
        env="RESPGW_BOOTSTRAP_ADDRESS",
    )
    bootstrap_timeout_s: float = option(
        10.0, "Deadline of each bootstrap call, in seconds.", env="RESPGW_BOOTSTRAP_TIMEOUT_S"
    )
    tool_max_rounds: int = option(
        8,
        "Most hub calls of one turn whose code_interpreter or shell calls the router runs (the "
        "tool loop); the last one is made without those tools, so the model answers.",
        env="RESPGW_TOOL_MAX_ROUNDS",
    )
    tool_output_chars: int = option(
        16000,
        "Most characters of a code_interpreter or shell call's output the model reads back (the "
        "middle of a longer output is left out).",
        env="RESPGW_TOOL_OUTPUT_CHARS",
    )
    bootstrap_headers: str = option(
        "",
        "Comma-separated request headers forwarded to the bootstrap service (never authorization).",
        env="RESPGW_BOOTSTRAP_HEADERS",
    )
    api_keys: str = option(
        "",
        "Comma-separated KEY=TENANT pairs. Empty runs single-tenant without authentication "
        "(every caller is tenant 'default'): for local use only.",
        env="RESPGW_API_KEYS",
    )
    tenant_models: str = option(
        "",
        "Comma-separated TENANT=MODEL|MODEL entries: the models each listed tenant may use. GET "
        "/v1/models lists only those to it, and any other model (or none) is a 404 "
        "model_not_found on every route that calls the hub. A tenant not listed may use every "
        "model. Empty: no limits.",
        env="RESPGW_TENANT_MODELS",
    )
    hub_session_header: str = option(
        "x-session-id",
        "Header that carries a turn's session key to the hub: the same for every turn of a "
        "conversation or previous_response_id chain, so that a prefix-cache-aware router in "
        "front of the model servers (vLLM's router, llm-d, an Envoy or Caddy hash on the header) "
        "keeps them on the replica that holds their prompt prefix. Empty sends no header.",
        env="RESPGW_HUB_SESSION_HEADER",
    )
    hub_prompt_cache_key: bool = option(
        True,
        "Also send the session key as prompt_cache_key in the hub request when the client sent "
        "none (OpenAI uses it to route to a warm prompt cache; vLLM ignores it).",
        env="RESPGW_HUB_PROMPT_CACHE_KEY",
    )
    tokenizer: str = option(
        "auto",
        "How POST /v1/responses/input_tokens counts: auto asks the hub's tokenizer (a chat hub's "
        "POST /tokenize at its root, the shape vLLM and SGLang serve, chat template applied; a "
        "Responses hub's POST /responses/input_tokens) and estimates when the hub has none "
        "(remembered for 10 minutes); llamacpp uses llama.cpp's /apply-template and /tokenize; "
        "off always estimates (bytes of the request's text / 4).",
        env="RESPGW_TOKENIZER",
    )
    seal_keys: str = option(
        "",
        "Comma-separated ID=BASE64 pairs of 32-byte keys that seal the encrypted_content the "
        "gateway mints (reasoning for store: false clients, compaction summaries): the first "
        "seals, every one opens (rotate by putting a new key first). Empty makes a random key "
        "at start: sealed reasoning then does not survive a restart or open on another replica "
        "(compaction items are restored from the state service). Give every replica the same "
        "keys (a Secret).",
        env="RESPGW_SEAL_KEYS",
    )
    compaction_prompt: str = option(
        "",
        "Instruction the model is given to summarize a history for compaction "
        "(POST /v1/responses/compact, context_management); empty uses the built-in one.",
        env="RESPGW_COMPACTION_PROMPT",
    )
    strict_params: bool = option(
        False,
        "Refuse a POST /v1/responses body with a top-level parameter the gateway does not know "
        "(400 unknown_parameter). Off, such parameters are ignored, counted in "
        "respgw_router_ignored_parameters_total and logged once per name, so that clients keep "
        "working when the API grows.",
        env="RESPGW_STRICT_PARAMS",
    )
    max_body_bytes: int = option(
        32 * 1024 * 1024,
        "Largest request body accepted, in bytes (checked while the body is read, chunked "
        "bodies too: 413).",
        env="RESPGW_MAX_BODY_BYTES",
    )
    max_header_bytes: int = option(
        64 * 1024,
        "Largest request line and headers of a request, in bytes (431, or 414 for the URL "
        "alone), checked while they arrive.",
        env="RESPGW_MAX_HEADER_BYTES",
    )
    max_headers: int = option(
        100, "Most header fields in a request (431).", env="RESPGW_MAX_HEADERS"
    )
    header_timeout_s: float = option(
        10.0,
        "Seconds a request's line and headers may take to arrive, from its first byte (or from "
        "the connection's start, for its first request); then 408 and the connection is closed.",
        env="RESPGW_HEADER_TIMEOUT_S",
    )
    body_timeout_s: float = option(
        60.0,
        "Seconds a request's body may take to arrive after its headers; then 408 and the "
        "connection is closed.",
        env="RESPGW_BODY_TIMEOUT_S",
    )
    keep_alive_s: int = option(
        5,
        "Seconds an idle keep-alive connection is kept open between requests.",
        env="RESPGW_KEEP_ALIVE_S",
    )
    access_log_flush_s: float = option(
        0.5,
        "The access log (one line per request) is written in batches, at most this many "
        "seconds after its request ended (or at 64 KiB, or before any other log line); 0 "
        "writes each line as its request ends.",
        env="RESPGW_ACCESS_LOG_FLUSH_S",
    )
    max_connections: int = option(
        4096,
        "Most open client connections; a request on a connection over it is answered 503 and "
        "the connection closed. 0 for no limit.",
        env="RESPGW_MAX_CONNECTIONS",
    )
    max_streams: int = option(
        1024,
        "Most streamed responses (POST /v1/responses with stream: true) served at once; one "
        "more is a 503. 0 for no limit.",
        env="RESPGW_MAX_STREAMS",
    )
    max_streams_per_tenant: int = option(
        256,
        "Most streamed responses served at once for one tenant; one more is a 429. 0 for no limit.",
        env="RESPGW_MAX_STREAMS_PER_TENANT",
    )
    drain_timeout_s: float = option(
        30.0,
        "Seconds a stopping router waits for turns still running (streams whose client left, "
        "background responses); what is still running then is stored as failed.",
        env="RESPGW_DRAIN_TIMEOUT_S",
    )
    background_lease_s: float = option(
        10.0,
        "Seconds a router's claim on a background response lasts unless renewed (it renews "
        "every third of that while the model runs). Another router takes over a response whose "
        "lease ran out, so a crashed router's responses finish elsewhere within about this long "
        "plus --background-scan-interval-s.",
        env="RESPGW_BACKGROUND_LEASE_S",
    )
    background_scan_interval_s: float = option(
        2.0,
        "Mean seconds between a router's looks for background responses to take over (queued, "
        "or whose lease ran out); each wait is drawn between half and one and a half times this.",
        env="RESPGW_BACKGROUND_SCAN_INTERVAL_S",
    )
    background_max_attempts: int = option(
        3,
        "Times a background response is started (the first run and each takeover) before it is "
        "stored as failed; the model may be called this many times for one response.",
        env="RESPGW_BACKGROUND_MAX_ATTEMPTS",
    )
    background_max_running: int = option(
        64,
        "Most background responses one router takes over to run at once (the ones it accepted "
        "itself always run).",
        env="RESPGW_BACKGROUND_MAX_RUNNING",
    )
    background_max_pending_per_tenant: int = option(
        1000,
        "Most background responses of one tenant that may be queued or running at once; past "
        "it, new ones are refused with 429. 0 means no cap.",
        env="RESPGW_BACKGROUND_MAX_PENDING_PER_TENANT",
    )
    background_max_pending: int = option(
        10000,
        "Most background responses of all tenants that may be queued or running at once; past "
        "it, new ones are refused with 429. 0 means no cap.",
        env="RESPGW_BACKGROUND_MAX_PENDING",
    )
    store_running_streams: bool = option(
        True,
        "Store a streamed turn (stream and store true, not background) as in_progress while it "
        "runs, beside the stream, so that GET /v1/responses/{id} finds it then, as at OpenAI. "
        "Off, it is stored only at its end (GET is 404 meanwhile). Costs one state call per "
        "streamed turn, and one more every third of --running-stream-lease-s while it runs.",
        env="RESPGW_STORE_RUNNING_STREAMS",
    )
    running_stream_delay_s: float = option(
        0.0,
        "Seconds a streamed turn runs before its in_progress form is stored (with "
        "--store-running-streams): a stream that ends sooner costs no state call for it, and "
        "GET /v1/responses/{id} is 404 until then. 0 stores it at once, as OpenAI shows it.",
        env="RESPGW_RUNNING_STREAM_DELAY_S",
    )
    running_stream_lease_s: float = option(
        30.0,
        "Seconds a router's lease on a streamed turn it stores as in_progress lasts unless "
        "renewed (it renews every third of that while the stream runs). When the router stops "
        "mid-stream, another router stores the turn as failed within about this long plus "
        "--background-scan-interval-s.",
        env="RESPGW_RUNNING_STREAM_LEASE_S",
    )
