"""The OpenAI-compatible chat agent: any server that speaks ``POST {base_url}/chat/completions``.

Hosted APIs, vLLM, Ollama and llama.cpp's server all do. One step is one conversation:

1. before every call the step's token hold is checked and the call's ``max_tokens`` is
   capped to what the hold still covers after an estimate of the prompt (refused →
   ``budget_exhausted``); after every call the server's ``usage`` is charged, also when
   the step then fails;
2. tool calls the model asks for are run (importable python functions, sync or async)
   and their results fed back, for at most ``spec.max_steps`` rounds;
3. with an ``output_schema`` the model is asked for JSON (in the prompt, and through the
   server's ``json_schema`` response format when it accepts one), the answer is
   validated, and one repair call is made if it does not fit (still wrong → ``schema``);
4. 429, 5xx, timeouts and dropped connections are retried with backoff (honouring
   ``Retry-After``) within the step's deadline, then fail as ``unavailable``; 401/403
   fail at once as ``auth``; anything else the server refuses is ``provider``.

The API key is read from the environment variable named by ``api_key_env`` when a step
runs, is sent only in the ``Authorization`` header, and is scrubbed from everything the
server sends back, so it never reaches an outcome, an event or a log line.

The package, by role: :mod:`.config` (the agents-file table), :mod:`.tools` (python
functions the model may call), :mod:`.wire` (typed, lenient parsing of what the server
sends), :mod:`.transport` (pooled HTTP clients, retries), :mod:`.retry` (backoff),
:mod:`.capabilities` (what the server accepts), :mod:`.concurrency` (calls in flight),
:mod:`.conversation` (one step: calls, tool rounds, structured output) and :mod:`.agent`
(the agent object).
"""

from .agent import OpenAIAgent as OpenAIAgent
from .agent import definition_from_config as definition_from_config
from .config import OpenAIAgentConfig as OpenAIAgentConfig
from .config import OpenAIToolConfig as OpenAIToolConfig
from .retry import backoff as backoff

__all__ = [
    "OpenAIAgent",
    "OpenAIAgentConfig",
    "OpenAIToolConfig",
    "backoff",
    "definition_from_config",
]
