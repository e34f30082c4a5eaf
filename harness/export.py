"""Exported backbones: a timm architecture + safetensors weights + the feature spec evaluations read."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import get_norm_layer

from harness.api import ExportedBackbone, FeatureSpec
from harness.atomic import write_atomic, write_json
from harness.errors import UserError

WEIGHTS, META = "backbone.safetensors", "backbone.json"


def save_export(exp: ExportedBackbone, folder: str | Path) -> Path:
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in exp.state_dict.items()}
    tmp = folder / f".{WEIGHTS}.tmp"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp))
    write_atomic(folder / WEIGHTS, lambda f: f.write(tmp.read_bytes()))
    tmp.unlink()
    meta = {"timm_name": exp.timm_name, "timm_kwargs": exp.timm_kwargs, "label": exp.label,
            "feature_spec": dataclasses.asdict(exp.feature_spec)}
    module = registering_module(exp.timm_name)
    if module:
        meta["timm_module"] = module
    write_json(folder / META, meta)
    return folder / WEIGHTS


def registering_module(timm_name: str) -> str | None:
    """The module that registered ``timm_name`` with timm when it is not one of timm's own models (a
    method's backbone, e.g. ExtreMA's): exports record it so any process can rebuild the model."""
    module = timm.models.model_entrypoint(timm_name).__module__
    return None if module.split(".")[0] == "timm" else module


def build_timm(timm_name: str, timm_kwargs: dict[str, Any], timm_module: str | None = None) -> torch.nn.Module:
    """The timm model an export describes, headless (num_classes=0), never downloading weights.
    A ``norm_layer`` given by name (JSON cannot hold a class) is resolved through timm's registry;
    ``timm_module`` (recorded by ``save_export``) is imported first so that it registers ``timm_name``."""
    if timm_module:
        try:
            importlib.import_module(timm_module)
        except ImportError as e:
            raise UserError("checkpoint", f"the export's architecture module {timm_module!r} cannot be imported "
                            f"({e})", "install the package that defines it") from None
    kwargs = dict(timm_kwargs)
    if isinstance(kwargs.get("norm_layer"), str):
        kwargs["norm_layer"] = get_norm_layer(kwargs["norm_layer"])
    return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)


def load_export(folder: str | Path, **timm_overrides: Any) -> tuple[torch.nn.Module, FeatureSpec, dict[str, Any]]:
    """The exported backbone; ``timm_overrides`` (e.g. ``drop_path_rate`` for fine-tuning) change how it is
    built, not its weights."""
    folder = Path(folder)
    if not (folder / WEIGHTS).exists() or not (folder / META).exists():
        raise UserError("checkpoint", f"no exported backbone in {str(folder)!r}",
                        "run (or re-run) the pre-training stage that writes it")
    meta = json.loads((folder / META).read_text())
    model = build_timm(meta["timm_name"], {**meta["timm_kwargs"], **timm_overrides}, meta.get("timm_module"))
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:
        raise UserError("checkpoint", f"{folder / WEIGHTS} is unreadable ({e})",
                        "re-run the pre-training stage") from None
    model.load_state_dict(state, strict=True)
    return model, FeatureSpec(**meta["feature_spec"]), meta
