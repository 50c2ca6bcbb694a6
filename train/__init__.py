"""train: the separate trainer that consumes the Parquet subsets `curate` materialises.

It imports nothing from `curate`, so any tool that writes the same Parquet can feed it. The training
commands (SFT with loss masks, online EKSFT and Q-Tuning, calibration, evaluation) are not built yet.
"""
