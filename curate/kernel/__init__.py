"""The kernel both sides share: ``curate`` (the engine) and ``train`` (the trainer) import it, and it imports
neither of them, nor anything heavy at module level (torch, transformers, vllm, duckdb load inside the
functions that need them).

- ``chat_tokens``: the templated conversation's tokens and which of them are response tokens;
- ``answers``: answer extraction and the one ``grade`` (numeric and multiple choice);
- ``machine``: the device and the precision that fits it (``auto``);
- ``vllm_factory``: the one place a vLLM engine is opened, with its options and its share of the device;
- ``keys``: run identities (a spec hashed whole, with the signals version);
- ``runs``, ``lock``, ``atomic``, ``fingerprint``: the run registry, the workspace writer lock, files that
  appear whole or not at all, and model fingerprints.
"""
