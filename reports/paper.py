"""The paper numbers: one row per (method, backbone, epochs, evaluation, protocol, metric).

The packaged file ``reports/data/paper_numbers.csv`` is filled from ``research/paper_numbers.md``;
only numbers read verbatim in a paper table or official README are in it. Variants that share a key
with the main method (EsViT view-only, ExtreMA masking/colour checkpoints) carry a suffixed method
name (``esvit-v``, ``extrema-nocolor``) so every key stays unique and joins never fan out.

``seed_values``: the paper's per-seed numbers, "/"-separated, where it gives them (empty otherwise).
``pretrain_data`` / ``eval_data``: the datasets the number was measured on (names in
``reports/data/datasets.json``); a run joins the number only when its recorded data fingerprints are those.
"""

from __future__ import annotations

import importlib.resources
import os

import pandas as pd

COLUMNS = ("method", "backbone", "epochs", "evaluation", "protocol", "metric", "value", "seed_values", "source",
           "verified", "note", "pretrain_data", "eval_data")
KEY = ("method", "backbone", "epochs", "evaluation", "protocol", "metric")
_BOOL = {"true": True, "false": False}


def load_paper_numbers(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and validate the paper-numbers CSV (the packaged one when ``path`` is None).

    Returns ``epochs`` as int, ``value`` as float and ``verified`` as bool. Raises ValueError naming the
    offending column for a missing column, a non-numeric value/epochs entry, a non-boolean verified
    entry, or duplicate keys.
    """
    if path is None:
        resource = importlib.resources.files("reports") / "data" / "paper_numbers.csv"
        with importlib.resources.as_file(resource) as p:
            return _parse(_read(p), str(p))
    return _parse(_read(path), str(path))


def _read(path: str | os.PathLike) -> pd.DataFrame:
    # Everything as text first: "NA" or an empty note must not silently turn into NaN.
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _parse(df: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; expected {list(COLUMNS)}")
    df = df[list(COLUMNS)].copy()
    for col in ("method", "backbone", "evaluation", "protocol", "metric", "pretrain_data", "eval_data"):
        empty = df.index[df[col].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"{where}: column {col!r} is empty in data rows {_rows(empty)}")
    df["value"] = _numeric(df, "value", where)
    df["seed_values"] = [_seeds(v, i, where) for i, v in enumerate(df["seed_values"])]
    epochs = _numeric(df, "epochs", where)
    if (epochs % 1 != 0).any():
        raise ValueError(f"{where}: column 'epochs' must hold whole numbers")
    df["epochs"] = epochs.astype(int)
    verified = df["verified"].str.strip().str.lower()
    bad = df.index[~verified.isin(list(_BOOL))].tolist()
    if bad:
        raise ValueError(f"{where}: column 'verified' must be true/false, not in data rows {_rows(bad)}")
    df["verified"] = verified.map(_BOOL).astype(bool)
    dup = df.duplicated(list(KEY), keep=False)
    if dup.any():
        raise ValueError(f"{where}: duplicate keys {list(KEY)} in data rows {_rows(df.index[dup].tolist())}")
    return df.reset_index(drop=True)


def _numeric(df: pd.DataFrame, col: str, where: str) -> pd.Series:
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    bad = df.index[values.isna()].tolist()
    if bad:
        raise ValueError(f"{where}: column {col!r} is not numeric in data rows {_rows(bad)}")
    return values.astype(float)


def _seeds(text: str, i: int, where: str) -> list[float]:
    try:
        return [float(v) for v in text.split("/") if v.strip()]
    except ValueError:
        raise ValueError(f"{where}: column 'seed_values' must be numbers separated by '/', not in data rows "
                         f"{_rows([i])}") from None


def _rows(index: list[int]) -> list[int]:
    # 1-based data rows (the header is not counted), as a person reading the CSV counts them.
    return [i + 1 for i in index]
