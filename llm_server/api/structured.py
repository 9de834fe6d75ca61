"""``response_format`` -> vLLM's structured outputs.

vLLM compiles the constraint into a grammar (xgrammar by default; vLLM falls back to guidance
or outlines for schemas xgrammar does not cover, on CPU as on GPU) and masks every token that
would break it, so even a model with random weights answers valid JSON. This module only
checks the schema and says which constraint to ask for.
"""

from __future__ import annotations

from typing import Any

from llm_server.api.protocol import (
    JSONObjectFormat,
    JSONSchemaFormat,
    ResponseFormat,
)
from llm_server.errors import BadRequest


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """400 unless ``schema`` is a valid JSON Schema (against its own metaschema)."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        raise BadRequest(
            f"{param} is not a valid JSON Schema: {exc.message}"
            + (f" (at {where})" if where else ""),
            param=param,
        ) from None
    except RecursionError:  # the metaschema check recurses once per level of the schema
        raise BadRequest(f"{param} is nested too deeply", param=param) from None
    except jsonschema.exceptions.UnknownType as exc:  # pragma: no cover - defensive
        raise BadRequest(f"{param} is not a valid JSON Schema: {exc}", param=param) from None


def structured_outputs_for(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """Keyword arguments of vLLM's ``StructuredOutputsParams`` for ``response_format``, or
    None when the answer is free text."""
    if isinstance(response_format, JSONObjectFormat):
        return {"json_object": True}
    if isinstance(response_format, JSONSchemaFormat):
        schema = response_format.json_schema.json_schema
        if not schema:  # no schema: any JSON object
            return {"json_object": True}
        check_json_schema(schema, "response_format.json_schema.schema")
        return {"json": schema}
    return None
