"""pydantic-ai agents for the tests, importable by worker processes as ``tests.pydantic_ai_agents``.

Each agent is built when an agents file names it (module ``__getattr__``), talking to the
loopback server in ``PA_TEST_BASE_URL`` as model ``PA_TEST_MODEL`` (default ``m``), so a
test starts its server first and then loads the file, in this process or in a worker.
The OpenAI client retries nothing itself unless ``PA_TEST_RETRIES`` says so: the tests
count requests. ``PA_TEST_MAX_TOKENS_FIELD=max_tokens`` sends the cap as ``max_tokens``
(llama-cpp-python's server ignores ``max_completion_tokens``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from openai import AsyncOpenAI
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.profiles.openai import OpenAIModelProfile
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

TOOL_THREADS: list[str] = []
"""The threads the ``lookup`` tool ran on (in this process)."""
CLIENTS: list[AsyncOpenAI] = []
"""Every client made in this process (a test closes them: they outlive its event loop)."""


class City(BaseModel):
    """A structured answer."""

    name: str
    population: int


def model() -> OpenAIChatModel:
    """The test's loopback server as a pydantic-ai model."""
    client = AsyncOpenAI(
        base_url=os.environ["PA_TEST_BASE_URL"],
        api_key="sk-test-unused",
        max_retries=int(os.environ.get("PA_TEST_RETRIES", "0")),
    )
    CLIENTS.append(client)
    profile = None
    if os.environ.get("PA_TEST_MAX_TOKENS_FIELD") == "max_tokens":
        profile = OpenAIModelProfile(openai_chat_supports_max_completion_tokens=False)
    return OpenAIChatModel(
        os.environ.get("PA_TEST_MODEL", "m"),
        provider=OpenAIProvider(openai_client=client),
        profile=profile,
    )


def lookup(city: str) -> str:
    """Look a city up."""
    TOOL_THREADS.append(threading.current_thread().name)
    return f"{city}: 1000 people (looked up by process {os.getpid()})"


def _writer() -> Agent[None, str]:
    return Agent(model(), instructions="Answer in one short sentence.")


def _capped() -> Agent[None, str]:
    return Agent(model(), model_settings=ModelSettings(max_tokens=40))


def _city() -> Agent[None, City]:
    return Agent(model(), output_type=NativeOutput(City), retries={"output": 1})


def _tooled() -> Agent[None, str]:
    return Agent(model(), tools=[lookup])


_AGENTS: dict[str, Callable[[], Agent[None, Any]]] = {
    "writer": _writer,
    "capped": _capped,
    "city": _city,
    "tooled": _tooled,
}


def __getattr__(name: str) -> Any:
    if name in _AGENTS:
        return _AGENTS[name]()
    raise AttributeError(name)
