"""curate: score, select and export LLM fine-tuning data by the model's own signals.

Layers, each a folder, each importing only the ones below it (``tests/test_layers.py`` reads the import graph):

- ``kernel/``: what curate and the trainer (``train``) share; imports nothing of ours;
- ``store/``: the workspace (Parquet tables, schemas, SQL views, example streams, run references, verify);
- ``models/``: handles to models (registry, engines, the output head, served clients, scorers, teachers);
- ``stages/``: one module per pipeline verb, on one stage runner (``stages/runner.py``);
- ``looks/``: read-only views (show, report, plot);
- ``experiments/``: the study, InstructDiff's iterations, the demo: the only part that imports ``train``;
- ``cli/``: the ``curate`` command, a thin shell over the functions above (one module per group of verbs).

Importing this package is cheap: torch, transformers and vllm are imported only by the functions that use them.
"""

__version__ = "0.1.0"
