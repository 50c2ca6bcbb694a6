"""train: the separate trainer that consumes the Parquet subsets `curate` materialises.

It reads only Parquet, so any tool that writes the same columns can feed it. From `curate` it imports the
shared kernel alone (``curate.kernel``: response-token spans, answer grading, device and precision, the vLLM
engine factory, atomic writes, run records), so the tokens a mask is made for and the answers a trace is
graded by are defined once, the same on both sides; nothing of curate's engine, SQL or workspace code.
"""
