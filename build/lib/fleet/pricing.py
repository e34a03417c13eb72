"""What a model call costs: exact decimal dollars, kept as integer micro-dollars.

Prices come from two places, the first that knows the model wins:

1. the agents file's ``[prices."MODEL"]`` tables, for self-hosted or unlisted models::

       [prices."qwen2.5-7b"]        # the model name as the agent sends it
       input_per_mtok = 0.10        # USD per million prompt tokens
       output_per_mtok = 0.40       # USD per million completion tokens

2. `genai-prices <https://github.com/pydantic/genai-prices>`_, pydantic's maintained
   price database. fleet uses only its bundled data snapshot (``calc_price``); it never
   starts the package's optional auto-updater, so pricing makes no network call.

A model found in neither has no price (:func:`price_model` returns ``None``). Where
dollars are counted (the workflow or an account above it has a dollar limit) the agent
then fails the step with ``error="no_price"`` before any request, unless told
``unknown_price = "allow"`` (see :func:`no_price_message`). Never a silent zero. Under a
token-only budget, or none, an unpriced model runs.

Money is exact: prices are :class:`~decimal.Decimal`, a call's cost is rounded **up**
to a whole micro-dollar (a millionth of a dollar, never under-counting), and ledgers
store integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal

from .errors import BudgetError, ConfigError

__all__ = [
    "MICROS_PER_USD",
    "ModelPrice",
    "UnknownPrice",
    "micros_to_usd",
    "no_price_message",
    "parse_prices",
    "price_model",
    "usd_to_micros",
]

MICROS_PER_USD = 1_000_000
"""Micro-dollars in one US dollar: the ledgers' unit of money."""

UnknownPrice = Literal["refuse", "allow"]
"""What to do with a model that has no price: fail the step (``no_price``) or run it
uncharged, counted as unpriced (``allow``, only when said explicitly)."""

_PRICE_KEYS = ("input_per_mtok", "output_per_mtok")


def usd_to_micros(value: Any, what: str) -> int:
    """Whole micro-dollars in ``value`` dollars (a ``Decimal``, ``int``, ``str`` or ``float``).

    Floats are read through their shortest text form (``0.1`` is ten cents exactly).

    Raises:
        BudgetError: ``value`` is not a number, is negative, not finite, or finer than
            a micro-dollar.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise BudgetError(f"{what} must be a number of US dollars, got {value!r}")
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise BudgetError(f"{what} must be a number of US dollars, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise BudgetError(f"{what} must be a finite, non-negative number of dollars, got {value!r}")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise BudgetError(
            f"{what} {value!r} is finer than a micro-dollar (0.000001); round it to six decimals"
        )
    return int(micros)


def micros_to_usd(micros: int) -> Decimal:
    """``micros`` micro-dollars as exact dollars (``Decimal``, six decimals)."""
    return Decimal(micros).scaleb(-6).quantize(Decimal("0.000001"))


@dataclass(frozen=True)
class ModelPrice:
    """How one model is priced, and what a call with some usage costs."""

    model: str
    """The model name the agent sends."""
    source: str
    """Where the price came from: the agents file (``prices``) or ``genai-prices``."""
    input_per_mtok: Decimal | None = None
    """USD per million prompt tokens (the override table)."""
    output_per_mtok: Decimal | None = None
    """USD per million completion tokens (the override table)."""
    provider: str | None = None
    """genai-prices' provider id, when it priced the model."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The exact price in dollars of a call with this usage."""
        if self.input_per_mtok is not None and self.output_per_mtok is not None:
            return (
                self.input_per_mtok * prompt_tokens + self.output_per_mtok * completion_tokens
            ) / MICROS_PER_USD
        return _genai_cost(self.model, self.provider, prompt_tokens, completion_tokens)

    def cost_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The call's price in micro-dollars, rounded up."""
        exact = self.cost(prompt_tokens, completion_tokens) * MICROS_PER_USD
        return int(exact.to_integral_value(rounding=ROUND_CEILING))

    def most_completion(self, prompt_tokens: int, room_micros: int, ceiling: int) -> int:
        """The largest ``max_tokens <= ceiling`` whose worst case fits ``room_micros``.

        Returns 0 when not even one completion token fits after the prompt.
        """
        if self.cost_micros(prompt_tokens, ceiling) <= room_micros:
            return ceiling
        low, high = 0, ceiling  # cost(low) fits or low == 0; cost(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            if self.cost_micros(prompt_tokens, middle) <= room_micros:
                low = middle
            else:
                high = middle
        return low


def _genai_cost(model: str, provider: str | None, prompt: int, completion: int) -> Decimal:
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=prompt, output_tokens=completion)
    return calc_price(usage, model, provider_id=provider).total_price


@lru_cache(maxsize=256)
def _genai_provider(model: str, provider: str | None, base_url: str | None) -> str | None:
    """genai-prices' provider id for ``model`` (``None`` when it does not know the model).

    An explicit ``provider`` is asked first, then the provider whose API the base URL
    is, then whichever provider's models match the name.
    """
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=1, output_tokens=1)
    attempts: list[tuple[str | None, str | None]] = []
    if provider:
        attempts.append((provider, None))
    else:
        if base_url:
            attempts.append((None, base_url))
        attempts.append((None, None))
    for provider_id, api_url in attempts:
        try:
            if api_url is not None:
                found = calc_price(usage, model, provider_api_url=api_url)
            else:
                found = calc_price(usage, model, provider_id=provider_id)
        except LookupError:
            continue
        return str(found.provider.id)
    return None


def price_model(
    model: str,
    *,
    prices: Mapping[str, ModelPrice] | None = None,
    provider: str | None = None,
    base_url: str | None = None,
) -> ModelPrice | None:
    """How ``model`` is priced: the override table first, then genai-prices.

    Args:
        model: the model name as the agent sends it.
        prices: the agents file's ``[prices."MODEL"]`` tables (see :func:`parse_prices`).
        provider: genai-prices' provider id (e.g. ``"openai"``), when known.
        base_url: the server's API root, to recognise a hosted provider.

    Returns:
        The price, or ``None`` when no source knows the model.
    """
    if prices and model in prices:
        return prices[model]
    found = _genai_provider(model, provider, base_url)
    if found is None:
        return None
    return ModelPrice(model=model, source="genai-prices", provider=found)


def no_price_message(model: str, agent: str) -> str:
    """The ``no_price`` refusal: names the model and shows the table to add."""
    return (
        f"model {model!r} of agent {agent!r} has no price: genai-prices does not list it "
        "and the agents file has no price table for it, so its cost cannot be counted "
        "against the dollar limit. "
        "Add to the agents file:\n\n"
        f'[prices."{model}"]\n'
        "input_per_mtok = 0.0    # USD per million prompt tokens\n"
        "output_per_mtok = 0.0   # USD per million completion tokens\n\n"
        'or set unknown_price = "allow" on the agent (or at the top of the agents file) '
        "to run it without counting its cost"
    )


def _price_value(value: Any, where: str, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{where}: {key} must be a number of USD per million tokens, got {value!r}",
            key=key,
        )
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{where}: {key} must be a finite, non-negative number, got {value!r}", key=key
        )
    return Decimal(str(value))


def parse_prices(tables: Any, source: str) -> dict[str, ModelPrice]:
    """Read the ``[prices."MODEL"]`` tables of an agents file.

    Raises:
        ConfigError: ``prices`` is not a table of tables, a table misses a key or has
            an unknown one, or a price is not a finite, non-negative number.
    """
    if not isinstance(tables, dict):
        raise ConfigError(
            f'{source}: prices must be a table of [prices."MODEL"] tables, got {tables!r}',
            key="prices",
        )
    prices: dict[str, ModelPrice] = {}
    for model, table in tables.items():
        where = f'{source}: [prices."{model}"]'
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where} must be a table with input_per_mtok and output_per_mtok, got {table!r}",
                key=f"prices.{model}",
            )
        unknown = sorted(set(table) - set(_PRICE_KEYS))
        missing = [key for key in _PRICE_KEYS if key not in table]
        if unknown or missing:
            raise ConfigError(
                f"{where} "
                + (f"has unknown keys {unknown!r}" if unknown else f"misses {missing!r}")
                + "; a price table has exactly input_per_mtok and output_per_mtok",
                key=f"prices.{model}",
            )
        prices[model] = ModelPrice(
            model=model,
            source="prices",
            input_per_mtok=_price_value(table["input_per_mtok"], where, "input_per_mtok"),
            output_per_mtok=_price_value(table["output_per_mtok"], where, "output_per_mtok"),
        )
    return prices
