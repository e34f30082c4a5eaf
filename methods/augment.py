"""Augmentation pipelines shared by methods (run in the data-loader workers)."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def mae_transform(img_size: int, scale: tuple[float, float]) -> T.Compose:
    """MAE ``main_pretrain.py`` transform_train: RandomResizedCrop (bicubic) + flip + normalise."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        normalize(),
    ])
