"""Table contracts between stages: one Arrow schema per workspace table.

Every stage writes exactly these columns, so a later stage (or another tool) can rely on them.
Later stages add their tables here, never in their own modules.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

ROLES = ("system", "user", "assistant")

EXAMPLES = pa.schema(
    [
        ("example_id", pa.string()),  # content hash of the canonical messages (see curate.records)
        ("source", pa.string()),  # file path or built-in source name it came from
        ("split", pa.string()),  # "pool" or "heldout" (deterministic by example_id)
        ("messages", pa.list_(MESSAGE)),
        ("reference_answer", pa.string()),  # nullable: the answer to verify generations against
        ("meta", pa.string()),  # JSON: origin (file, row) and the source fields not used in messages
    ]
)

REJECTS = pa.schema(
    [
        ("reject_id", pa.string()),  # hash of (source file, row, reason): re-ingest adds no duplicates
        ("source_file", pa.string()),
        ("row", pa.int64()),  # 1-based line (JSONL, CSV) or row index + 1 (JSON array, Parquet)
        ("reason", pa.string()),  # short machine-readable code, counted per ingest
        ("detail", pa.string()),  # human-readable explanation
        ("raw", pa.string()),  # the offending record, cut to 2,000 characters
    ]
)

TABLES: dict[str, pa.Schema] = {"examples": EXAMPLES, "rejects": REJECTS}
