"""Presets as a researcher reads them (``repro methods METHOD [PRESET]``): every resolved value, where it
comes from, and which values differ from the paper recipe the preset derives from."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from tabulate import tabulate

from harness.config import NOT_IDENTITY, TrainConfig, recipe_deviations, resolve


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def preset_rows(method_cls: type, preset_name: str) -> tuple[str, list[dict[str, str]]]:
    """A header line and one row per setting: value, the paper recipe's value where it differs, source."""
    train, _, flat = resolve(method_cls, preset_name, {})
    preset = method_cls.presets[preset_name]
    paper_name, devs = recipe_deviations(method_cls, preset_name, flat)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    rows = []
    for key, value in flat.items():
        cited = preset.values.get(key)
        owner = "TrainConfig" if key in train_fields else method_cls.config_cls.__name__
        source = cited.source if cited else f"default of {owner}"
        if key in NOT_IDENTITY:
            source += " (bookkeeping: not part of the cell id)"
        rows.append({"setting": key, "value": _fmt(value),
                     "paper recipe": f"* {_fmt(devs[key][0])}" if key in devs else "", "source": source})
        if key == "lr_batch_denom":  # the derived lr, where its inputs are
            rows.append({"setting": "(lr)", "value": _fmt(train.lr), "paper recipe": "",
                         "source": "blr * batch_size / lr_batch_denom"})
    if paper_name is None:
        recipe = "no paper recipe to compare with"
    elif paper_name == preset_name:
        recipe = "this preset is the paper recipe"
    else:
        recipe = f"derives from the paper recipe '{paper_name}'; * marks the {len(devs)} values that differ"
    header = f"{method_cls.name} {preset_name}: {preset.description}\n{recipe}"
    return header, rows


def describe_method(method_cls: type) -> str:
    doc = (method_cls.__doc__ or sys.modules[method_cls.__module__].__doc__ or "").strip().splitlines()
    rows = [{"preset": name, "paper recipe": p.paper_recipe or name, "description": p.description}
            for name, p in method_cls.presets.items()]
    return "\n".join([f"{method_cls.name}: {doc[0] if doc else ''}",
                      tabulate(rows, headers="keys", tablefmt="github"),
                      f"every value of a preset: repro methods {method_cls.name} PRESET"])
