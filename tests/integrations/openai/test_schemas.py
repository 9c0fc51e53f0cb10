"""Tool schemas for both APIs, generated from the callables and accepted by the SDK types."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from openai.types.chat import ChatCompletionToolUnionParam
from openai.types.responses import ToolParam
from pydantic import BaseModel, Field, TypeAdapter

from onceonly_core.errors import ConfigError
from onceonly_openai import Tool, ToolDispatcher, tool


class Address(BaseModel):
    city: str
    zip: str


def ship(
    order_id: Annotated[str, Field(description="The order")],
    address: Address,
    speed: Literal["slow", "fast"] = "slow",
    json: bool = False,  # a name BaseModel also has: must not break the model
) -> str:
    """Ship an order.

    Longer text that is not part of the description.
    """
    return "ok"


def test_function_schema_from_signature() -> None:
    t = tool(ship)
    params = t.parameters()
    assert t.description == "Ship an order."
    assert params["required"] == ["order_id", "address"]
    assert params["properties"]["order_id"] == {"type": "string", "description": "The order"}
    assert params["properties"]["speed"]["enum"] == ["slow", "fast"]
    assert params["additionalProperties"] is False and "$defs" in params
    assert (
        t.validate({"order_id": "o", "address": {"city": "x", "zip": "1"}, "json": True})["json"]
        is True
    )
    strict = t.parameters(strict=True)
    assert strict["required"] == ["order_id", "address", "speed", "json"]
    assert strict["$defs"]["Address"]["additionalProperties"] is False


def test_schemas_are_accepted_by_the_request_types() -> None:
    d = ToolDispatcher([ship, tool(lambda text: text, name="echo", custom=True)], strict=True)
    chat = TypeAdapter(list[ChatCompletionToolUnionParam]).validate_python(d.chat_tools())
    resp = TypeAdapter(list[ToolParam]).validate_python(d.responses_tools())
    assert [c["type"] for c in chat] == ["function", "custom"]
    assert resp[0]["name"] == "ship" and resp[0]["strict"] is True and resp[1]["type"] == "custom"


def test_registration_errors() -> None:
    with pytest.raises(ConfigError):
        tool(ship, name="bad name!")
    with pytest.raises(ConfigError):
        ToolDispatcher({"other": tool(ship)})  # a Tool named "ship" under another name
    with pytest.raises(ConfigError):
        ToolDispatcher([ship, ship])
    with pytest.raises(ConfigError):
        tool(lambda: 1, name="nothing", custom=True)
    assert isinstance(tool(tool(ship)), Tool)


class Refund(BaseModel):
    order_id: str
    amount_usd: float
    reason: str = "customer request"


def test_a_pydantic_model_class_is_refused_with_a_way_out() -> None:
    with pytest.raises(ConfigError, match=r"pydantic model class, not a tool.*schema=Refund"):
        tool(Refund)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ToolDispatcher([Refund])  # type: ignore[list-item]


def test_schema_describes_and_validates_the_arguments() -> None:
    seen: list[dict[str, object]] = []

    def refund(**fields: object) -> str:
        """Refund an order."""
        seen.append(fields)
        return "refunded"

    t = tool(refund, schema=Refund)
    assert t.parameters()["required"] == ["order_id", "amount_usd"]
    assert t.responses_schema()["description"] == "Refund an order."
    # Coerced and completed by the model: what the function receives, and the key.
    assert t.validate({"order_id": "o1", "amount_usd": "25.00"}) == {
        "order_id": "o1",
        "amount_usd": 25.0,
        "reason": "customer request",
    }
    with pytest.raises(ConfigError):
        tool(refund, schema=dict)  # type: ignore[arg-type]
