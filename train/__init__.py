"""train: the separate trainer that consumes the Parquet subsets `curate` materialises.

It imports nothing from `curate`, so any tool that writes the same Parquet can feed it. `curate` imports
two modules from here (train.chat_tokens, train.answers), so the response tokens a mask is made for and
the answers a trace is graded by are defined once, the same on both sides.
"""
