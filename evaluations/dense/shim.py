"""A stand-in for mmcv's compiled extension (``mmcv._ext``) when only mmcv-lite is installed.

mmcv-lite ships ``mmcv.ops`` without its compiled module, so ``import mmseg.models`` / ``mmdet.models``
fail. UperNet needs no compiled op; Mask R-CNN needs NMS and RoIAlign (forward, backward), which
torchvision provides (its CUDA kernels on a GPU). Every other op name resolves (mmcv checks names at
import time) but raises, when called, an error naming the op. A compiled mmcv, when installed, wins.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.*)
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

MODULE = "mmcv._ext"


class MissingOpError(NotImplementedError):
    """A compiled mmcv op that the torchvision stand-in does not provide."""


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, offset: int = 0,
        **_: object) -> torch.Tensor:
    """mmcv ``nms`` (kept indices, by decreasing score); ``offset=1`` is mmcv's legacy +1 box width."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0,), dtype=torch.long)
    if offset:
        boxes = boxes.clone()
        boxes[:, 2:] += offset
    return tv_nms(boxes.float(), scores.float(), float(iou_threshold))


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int = 7, aligned_width: int = 7,
                      spatial_scale: float = 1.0, sampling_ratio: int = 0, pool_mode: int = 1,
                      aligned: bool = True) -> None:
    """mmcv ``roi_align_forward`` (writes ``output``); sampling_ratio 0 (adaptive) and ``aligned`` mean the
    same in torchvision. Only average pooling (pool_mode 1), the mode every mmdet RoI extractor uses."""
    if pool_mode != 1:
        raise MissingOpError(f"{MODULE}.roi_align_forward with pool_mode={pool_mode} (max): compiled mmcv op "
                             "not available with mmcv-lite; install a compiled mmcv==2.1.0")
    output.copy_(tv_roi_align(input, rois.to(input.dtype), (aligned_height, aligned_width),
                              spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned))


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor,
                       argmax_x: torch.Tensor, grad_input: torch.Tensor, aligned_height: int = 7,
                       aligned_width: int = 7, spatial_scale: float = 1.0, sampling_ratio: int = 0,
                       pool_mode: int = 1, aligned: bool = True) -> None:
    if pool_mode != 1:
        raise MissingOpError(f"{MODULE}.roi_align_backward with pool_mode={pool_mode} (max): compiled mmcv op "
                             "not available with mmcv-lite; install a compiled mmcv==2.1.0")
    b, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois.to(grad_output.dtype), spatial_scale, aligned_height, aligned_width,
        b, c, h, w, sampling_ratio, aligned))


PROVIDED = {"nms": nms, "roi_align_forward": roi_align_forward, "roi_align_backward": roi_align_backward}


def _missing(name: str):
    def op(*args: object, **kwargs: object):
        raise MissingOpError(f"{MODULE}.{name}: compiled mmcv op not available with mmcv-lite (the project "
                             f"provides only {', '.join(sorted(PROVIDED))}); install a compiled mmcv==2.1.0")

    op.__name__ = name
    return op


def build_module() -> types.ModuleType:
    """The stand-in module: the provided ops, and any other name as an op that raises when called."""
    module = types.ModuleType(MODULE)
    # mmengine's mmcv_full_available() asks pkgutil for a loader; a module without a spec breaks that.
    module.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
    for name, fn in PROVIDED.items():
        setattr(module, name, fn)

    def module_getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    module.__getattr__ = module_getattr
    return module


def is_stand_in(module: types.ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return spec is not None and spec.loader is None


def install() -> bool:
    """Put the stand-in in place unless a compiled ``mmcv._ext`` imports. True when the stand-in is active."""
    current = sys.modules.get(MODULE)
    if current is not None:
        return is_stand_in(current)
    try:
        importlib.import_module(MODULE)
        return False
    except ImportError:
        pass
    module = build_module()
    sys.modules[MODULE] = module
    import mmcv

    mmcv._ext = module
    return True
