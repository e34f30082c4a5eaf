"""Augmentation pipelines shared by methods (run in the data-loader workers)."""

from __future__ import annotations

import random

from PIL import Image, ImageFilter, ImageOps
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


class RandomGaussianBlur:
    """DINO ``utils.GaussianBlur``: with probability p, PIL Gaussian blur of radius U(0.1, 2.0)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class RandomSolarize:
    """DINO ``utils.Solarization``: with probability p, PIL solarize (threshold 128)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class MultiCropAugmentation:
    """DINO ``DataAugmentationDINO``: 2 global crops (blur p=1.0; blur p=0.1 + solarize p=0.2) and
    ``n_local`` local crops (blur p=0.5), each with flip + colour jitter (p=0.8) + grayscale (p=0.2).
    Returns the list [global1, global2, local1, ...]; the default collate batches each crop.
    ``color_jitter_prob`` and ``solarize_prob`` default to DINO's; a test recipe on greyscale data may
    lower them (on digits they decorrelate the two views more than anything else, see DINO's tiny preset)."""

    def __init__(self, global_size: int, local_size: int, n_local: int,
                 global_scale: tuple[float, float], local_scale: tuple[float, float],
                 color_jitter_prob: float = 0.8, solarize_prob: float = 0.2) -> None:
        flip_color = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                          p=color_jitter_prob),
            T.RandomGrayscale(p=0.2),
        ])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_color, RandomGaussianBlur(1.0), normalize()])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_color, RandomGaussianBlur(0.1), RandomSolarize(solarize_prob),
                                  normalize()])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
                                flip_color, RandomGaussianBlur(0.5), normalize()])
        self.n_local = n_local

    @classmethod
    def from_config(cls, cfg) -> MultiCropAugmentation:
        """From a config with DINO's crop fields (img_size, local_size, local_crops_number, scales,
        colour-jitter and solarize probabilities)."""
        return cls(cfg.img_size, cfg.local_size, cfg.local_crops_number, cfg.global_crops_scale,
                   cfg.local_crops_scale, cfg.color_jitter_prob, cfg.solarize_prob)

    def __call__(self, img: Image.Image) -> list:
        return [self.global1(img), self.global2(img), *(self.local(img) for _ in range(self.n_local))]
