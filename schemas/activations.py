"""Arrow schemas of the Parquet files the trace stage writes and the SAE/CKA stages read."""

from __future__ import annotations

import pyarrow as pa

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("window", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("doc_ids", pa.list_(pa.int32()), nullable=False),  # -1 for special tokens
    ]
)


def activation_schema(d: int) -> pa.Schema:
    """One row per token: the vector plus what traces it back to text."""
    return pa.schema(
        [
            pa.field("window", pa.int32(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("doc_id", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("activation", pa.list_(pa.float32(), d), nullable=False),
        ]
    )


STATS_METADATA_KEY = b"microscope.stats"
