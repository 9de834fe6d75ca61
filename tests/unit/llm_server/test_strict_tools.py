"""Tools marked ``strict`` under ``tool_choice="auto"``: the model may answer in text, but a
call it opens is held to the tool's parameter schema. The request's tool plan is checked
with the grammar engine vLLM decodes with (xgrammar), on whole answers: accepted text,
accepted calls, refused calls. (The tiny random model never opens a call by itself, so the
servers cannot show this end to end.)"""

from __future__ import annotations

import json

import pytest
from xgrammar import Grammar
from xgrammar.testing import _is_grammar_accept_string

from llm_server.api.protocol import ChatCompletionRequest
from llm_server.api.tools import ToolCalling

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}


def weather_tool(strict: bool | None) -> dict:
    function = {"name": "get_weather", "parameters": SCHEMA}
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}


def call(arguments: dict) -> str:
    payload = json.dumps({"name": "get_weather", "arguments": arguments})
    return f"<tool_call>\n{payload}\n</tool_call>"


@pytest.fixture(scope="module")
def hermes() -> ToolCalling:
    return ToolCalling(tokenizer=None, parser_name="hermes")


def plan_for(hermes: ToolCalling, strict: bool | None, **params: object):
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [weather_tool(strict)],
            **params,
        }
    )
    plan = hermes.plan(request)
    assert plan is not None
    return plan


def test_a_strict_tool_constrains_the_calls_but_not_the_text(hermes):
    plan = plan_for(hermes, strict=True)
    assert plan.structural_tag is not None
    grammar = Grammar.from_structural_tag(plan.structural_tag)
    accepted = [
        "It is sunny.",  # text: the model need not call
        "Let me check. " + call({"city": "Paris"}),
        call({"city": "Rome", "days": 3}),
    ]
    refused = [
        call({"city": "Oslo"}),  # not in the enum
        call({"days": 3}),  # required field missing
        call({"city": "Paris", "when": "now"}),  # no additional properties
        call({"city": "Paris", "days": "three"}),  # wrong type
    ]
    for answer in accepted:
        assert _is_grammar_accept_string(grammar, answer), answer
    for answer in refused:
        assert not _is_grammar_accept_string(grammar, answer), answer


@pytest.mark.parametrize("strict", [False, None], ids=["strict-false", "unset"])
def test_without_strict_an_unforced_call_is_not_constrained(hermes, strict):
    assert plan_for(hermes, strict=strict).structural_tag is None
