"""What every stage's details model shares: strict keys, and keys a writer leaves out rather than write null."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class Details(BaseModel):
    """A details model. `model_dump(mode="json")` gives exactly the dict a writer stores: fields named in
    `omit_if_none` are dropped when None (the writer never writes them then), every other None stays (the
    writer writes null there, and readers tell "absent" from "null" apart)."""

    # a writer adding a key no model declares fails the tests instead of passing unread
    model_config = ConfigDict(extra="forbid")
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in self.omit_if_none:
                if data.get(key, 0) is None:
                    del data[key]
        return data


class StageDetails(Details):
    """Details of a record made through the stage runner, which adds the stage's content prefix."""

    prefix: str = Field(description="The stage's content prefix in the store: {model_digest[:16]}/{stage}/{hash}.")
