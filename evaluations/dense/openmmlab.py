"""The one entry point that makes OpenMMLab usable here: ``prepare()``.

It checks that the ``dense`` extra is installed, puts the torchvision stand-in for mmcv's compiled ops in
place when no compiled mmcv is present (``shim``), allow-lists what mmengine checkpoints pickle so that
torch's ``weights_only`` loading stays on (``checkpoints``), imports mmseg and mmdet, and registers the
project's adapters and optimizer constructor. Idempotent; only dense jobs call it.
"""

from __future__ import annotations

import importlib.util

from harness.errors import UserError

BACKBONE = "ExportedBackbone"
CONSTRUCTOR = "LayerDecayOptimWrapperConstructor"
_PACKAGES = ("mmengine", "mmcv", "mmseg", "mmdet", "pycocotools")


def prepare() -> None:
    missing = [p for p in _PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError("evaluation", f"the dense evaluations need {', '.join(missing)}, which is not installed",
                        "install the project with its dense extra: pip install -e '.[dense]' (make install does)")
    from evaluations.dense import checkpoints, shim

    shim.install()
    checkpoints.allow_mmengine_globals()
    import mmdet.models  # noqa: F401  (fills mmdet's registries)
    import mmseg.models  # noqa: F401
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    from mmseg.registry import MODELS as SEG_MODELS

    from evaluations.dense.adapters import build_backbone
    from evaluations.dense.layer_decay import LayerDecayOptimWrapperConstructor

    for registry in (SEG_MODELS, DET_MODELS):
        if BACKBONE not in registry.module_dict:
            registry.register_module(name=BACKBONE, module=build_backbone)
    if CONSTRUCTOR not in OPTIM_WRAPPER_CONSTRUCTORS.module_dict:
        OPTIM_WRAPPER_CONSTRUCTORS.register_module(name=CONSTRUCTOR, module=LayerDecayOptimWrapperConstructor)
