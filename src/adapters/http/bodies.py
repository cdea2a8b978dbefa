"""Request bodies that may be left out."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import request
from quart_schema import RequestSchemaValidationError

from adapters.http.json_depth import refuse_if_too_deep

ModelT = TypeVar("ModelT", bound=BaseModel)


async def optional_body(model: type[ModelT]) -> ModelT:
    """An optional JSON body: none or empty gives the model's defaults; anything else must validate
    (a 422 problem otherwise, as for quart-schema's required bodies)."""
    if request.content_length == 0:
        return model()  # nothing to read (Quart would still start a task to wait for it)
    raw = await request.get_data(as_text=True)
    if not raw.strip():
        return model()
    refuse_if_too_deep(raw)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestSchemaValidationError(exc) from None
