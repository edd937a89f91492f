"""The API's vocabulary: the words of OpenAI's Responses API the gateway knows, in one place.

The request fields of ``ResponseCreateParams`` and the sampling fields of Chat Completions hubs,
the ``include`` values, the enums of request fields, the tool types (and what a Chat Completions
hub gets of each), the ``tool_choice`` forms, and the input item types with the id prefix each
gets. ``tests/router_svc/test_vocabulary.py`` fails when the installed openai SDK has a request
field, ``include`` value, tool type, ``tool_choice`` type or input item type missing here.

Only data lives here: :mod:`router_svc.validate` checks requests against it,
:mod:`router_svc.inputs` normalizes input items by it.
"""

from __future__ import annotations

# Every field of ResponseCreateParams in the openai SDK, plus stream (a test fails when the
# installed SDK has one more).
REQUEST_FIELDS = frozenset(
    {
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)

# Sampling parameters of Chat Completions hubs that the Responses API lacks: OpenAI's penalties
# and seed, and the extras vLLM, SGLang and llama.cpp servers take. They reach the hub as given;
# the response echoes the two penalties (0 when not given), as Open Responses defines them.
HUB_SAMPLING_FIELDS = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "min_tokens",
        "logit_bias",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "spaces_between_special_tokens",
        "chat_template_kwargs",
    }
)
# The top-level fields that are not "unknown" (ignored and counted, or refused when strict).
KNOWN_FIELDS = REQUEST_FIELDS | HUB_SAMPLING_FIELDS

# The values of ``include`` (ResponseIncludable).
INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
# The enums of request fields and of the items and parts in them.
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
SUMMARIES = ("auto", "concise", "detailed")
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
ROLES = ("user", "assistant", "system", "developer")
IMAGE_DETAILS = ("low", "high", "auto", "original")

# The ``type`` of a shell tool's ``environment``: ``local`` (the client runs the commands; also
# what no environment means) or a hosted container (FunctionShellToolParam's Environment).
SHELL_ENVIRONMENTS = ("container_auto", "local", "container_reference")

# The ``memory_limit`` values of a container (the Containers API's, and an auto container's).
CONTAINER_MEMORY_LIMITS = ("1g", "4g", "16g", "64g")

# The ``type`` of each tool of ``tools`` (ToolParam).
TOOL_TYPES = (
    "function",
    "file_search",
    "computer",
    "computer_use_preview",
    "web_search",
    "web_search_2025_08_26",
    "mcp",
    "code_interpreter",
    "programmatic_tool_calling",
    "image_generation",
    "local_shell",
    "shell",
    "custom",
    "namespace",
    "tool_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "apply_patch",
)
# What a Chat Completions hub gets of each tool type (README, "Known limits"). Offered as
# functions: function tools; custom tools (a function taking the free text as its one string
# argument, "input"); the function and custom tools of a namespace, flattened.
CHAT_OFFERED_TOOLS = frozenset({"function", "custom", "namespace"})
# Accepted but not offered to the model, and reported: a web search the gateway cannot run (the
# model answers without searching, as OpenAI's model may choose to), and code_interpreter and a
# hosted shell when no execution service runs them (when one does, the tool loop in
# router_svc.tool_loop offers them as functions and runs the calls, and leaves them out of what
# is checked here; it always offers a local shell, whose calls it returns to the client).
CHAT_NOT_RUN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "code_interpreter",
        "shell",
    }
)
# Refused: the tools whose results the caller would be relying on (file search over its vector
# stores, MCP servers, image generation), and those whose calls only OpenAI's models make.
CHAT_HOSTED_REFUSED = (
    "file_search",
    "mcp",
    "image_generation",
    "tool_search",
    "programmatic_tool_calling",
)
CHAT_CLIENT_REFUSED = ("computer", "computer_use_preview", "local_shell", "apply_patch")
# The ``type`` of a ``tool_choice`` object naming a hosted tool (ToolChoiceTypesParam), and of
# one naming a tool that has no name of its own; ``function``, ``custom``, ``allowed_tools`` and
# ``mcp`` choices carry more fields and are checked one by one.
HOSTED_TOOL_CHOICES = (
    "file_search",
    "web_search_preview",
    "computer",
    "computer_use_preview",
    "computer_use",
    "web_search_preview_2025_03_11",
    "image_generation",
    "code_interpreter",
)
BARE_TOOL_CHOICES = ("apply_patch", "shell", "programmatic_tool_calling")
# A ``tool_choice`` string (ToolChoiceOptions), and the ``type`` of a ``tool_choice`` object.
TOOL_CHOICE_OPTIONS = ("none", "auto", "required")
TOOL_CHOICE_TYPES = (
    "function",
    "custom",
    "allowed_tools",
    "mcp",
    *HOSTED_TOOL_CHOICES,
    *BARE_TOOL_CHOICES,
)

# The id prefix of each input item type, used when the caller sent an item without an id.
ID_PREFIXES: dict[str, str] = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "file_search_call": "fs",
    "computer_call": "cu",
    "computer_call_output": "cuo",
    "web_search_call": "ws",
    "tool_search_call": "tsc",
    "tool_search_output": "tso",
    "additional_tools": "at",
    "configuration_update": "cfg",
    "compaction": "cmp",
    "compaction_trigger": "cmpt",
    "image_generation_call": "ig",
    "code_interpreter_call": "ci",
    "local_shell_call": "lsh",
    "local_shell_call_output": "lsho",
    "shell_call": "sh",
    "shell_call_output": "sho",
    "apply_patch_call": "apc",
    "apply_patch_call_output": "apco",
    "mcp_list_tools": "mcpl",
    "mcp_approval_request": "mcpr",
    "mcp_approval_response": "mcpa",
    "mcp_call": "mcp",
    "program": "prg",
    "program_output": "prgo",
}
# Every input item type: the stored ones, and the reference to a stored item (never stored).
ITEM_TYPES = (*ID_PREFIXES, "item_reference")
