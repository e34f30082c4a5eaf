"""Dense transfer (ADE20K UperNet, COCO Mask R-CNN / Cascade Mask R-CNN) through OpenMMLab.

Nothing here imports mmengine, mmseg or mmdet at import time: the evaluation registry imports this
package for every command. ``evaluations.dense.openmmlab.prepare()`` makes OpenMMLab usable (compiled-op
replacement, checkpoint allow-list, the project's adapters in mmseg's and mmdet's registries); the config
builders (``seg_config``, ``det_config``) return plain mmengine config dicts for ``Runner.from_cfg``.
"""
