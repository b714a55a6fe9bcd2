"""Image statistics: the normalisation a model's images are trained and evaluated with."""

from __future__ import annotations

from mm_ptft.config import Config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_norm_stats(cfg: Config) -> tuple[list[float], list[float]]:
    """Normalisation mean/std: ``data.image.mean/std``, else the timm model's pretrained_cfg (averaged over channels
    for a one-channel tower), else ImageNet's."""
    import timm

    mean, std = cfg.data.image.mean, cfg.data.image.std
    if mean is None or std is None:
        pcfg = timm.models.get_pretrained_cfg(cfg.model.image.name)
        pmean = list(getattr(pcfg, "mean", None) or IMAGENET_MEAN)
        pstd = list(getattr(pcfg, "std", None) or IMAGENET_STD)
        if cfg.model.image.in_chans == 1:
            pmean, pstd = [sum(pmean) / len(pmean)], [sum(pstd) / len(pstd)]
        mean, std = mean or pmean, std or pstd
    return list(mean), list(std)
