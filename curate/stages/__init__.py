"""The pipeline verbs, one module each (ingest, score, probe, generate, best-of-n, select, export), and the shared stage runner. Import store, models and kernel."""
