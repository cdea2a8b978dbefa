"""Request bodies: a required JSON body validated into a model, and bodies that may be left out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request
from quart_schema import RequestSchemaValidationError, document_request

from adapters.http.json_depth import refuse_if_too_deep

ModelT = TypeVar("ModelT", bound=BaseModel)
Handler = Callable[..., Awaitable[Any]]


def validate_body(model: type[BaseModel]) -> Callable[[Handler], Handler]:
    """quart-schema's `validate_request` for a pydantic model, with the same OpenAPI description,
    400 for a body that is not JSON and 422 for one that does not validate, passed to the route as
    `data`. It validates with the model's own validator: quart-schema builds a pydantic
    TypeAdapter of the model on every request, which showed in every POST's profile."""

    def decorator(route: Handler) -> Handler:
        @wraps(route)
        async def validated(*args: Any, **kwargs: Any) -> Any:
            payload = await request.get_json()
            try:
                data = model.model_validate(payload)
            except (TypeError, ValueError) as error:  # ValidationError is a ValueError, as in quart-schema
                raise RequestSchemaValidationError(error) from None
            return await route(*args, data=data, **kwargs)

        return document_request(model)(validated)

    return decorator


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
