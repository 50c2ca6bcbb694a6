"""curate: score, select and export LLM fine-tuning data by the model's own signals.

Importing this package is cheap: torch, transformers and vllm are imported only by the modules that use
them. Entry points: ``curate.ingest.ingest``, ``curate.sql.connect`` / ``curate.sql.polars_context``,
``curate.models.pull`` / ``curate.models.resolve``; the ``curate`` command wraps them.
"""

__version__ = "0.1.0"
