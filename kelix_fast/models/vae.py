"""The DC-AE VAE of Kelix-DiT, through diffusers' ``AutoencoderDC`` (kelix-dit.md §7).

diffusers is imported on first use only: it takes seconds to import and the AR side never needs it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from kelix_fast.hub import resolve_pretrained
from kelix_fast.weights import engine_placement, resolve_dtype

if TYPE_CHECKING:
    from diffusers import AutoencoderDC

__all__ = ["decode_latents", "load_vae"]


def load_vae(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> AutoencoderDC:
    """Load a diffusers ``AutoencoderDC`` (``config.json`` + ``diffusion_pytorch_model.*``).

    path: a directory, or a Hugging Face repo id with the VAE's folder, as diffusers users write it
    (``"Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", subfolder="vae"``) or as the official
    demo does (``".../SANA1.5_1.6B_1024px_diffusers/vae"``); ``revision``, ``local_files_only`` and
    ``cache_dir`` as :func:`kelix_fast.hub.resolve_pretrained` takes them. device: default CUDA when
    available, else CPU. dtype (or its diffusers alias ``torch_dtype``, not both): a ``torch.dtype``
    or a name such as ``"bfloat16"``; default bfloat16 on CUDA, float32 on CPU.

    Raises:
        FileNotFoundError: no such directory or repo, or no config.json in it. ValueError: it holds
        another model.
    """
    dtype = resolve_dtype(dtype, torch_dtype, owner="load_vae")
    directory = resolve_pretrained(
        path,
        subfolder=subfolder,
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        arg="load_vae: path",
    )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"load_vae: no config.json in {directory} (expected a diffusers AutoencoderDC)"
        )
    with open(config_file, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    if class_name != "AutoencoderDC":
        raise ValueError(
            f"load_vae: {directory} must hold a diffusers AutoencoderDC, its config.json says "
            f"_class_name={class_name!r}"
        )
    from diffusers import AutoencoderDC

    device, dtype = engine_placement(device, dtype, owner="load_vae")
    # low_cpu_mem_usage=False: the default path needs the optional `accelerate` package and warns without it
    vae = AutoencoderDC.from_pretrained(
        os.fspath(directory), torch_dtype=dtype, low_cpu_mem_usage=False
    )
    return vae.to(device).eval()


@torch.inference_mode()
def decode_latents(vae: AutoencoderDC, latents: torch.Tensor) -> torch.Tensor:
    """DiT latents -> images, as the official demo does: ``decode(z / scaling_factor)``, then
    ``(x / 2 + 0.5).clamp(0, 1)`` in the VAE dtype, then ``round(255 * .)``.

    Args:
        latents: [B, C, h, w] float, C = the VAE's latent channels, on the VAE's device.

    Returns:
        [B, 32*h, 32*w, 3] uint8 (for the f32 DC-AE; the spatial factor comes from the VAE).
    """
    weight = next(vae.parameters())
    channels = vae.config.latent_channels
    if not isinstance(latents, torch.Tensor):
        raise TypeError(
            f"decode_latents: latents must be a torch.Tensor, got {type(latents).__name__}"
        )
    if latents.dim() != 4 or latents.shape[1] != channels or min(latents.shape) == 0:
        raise ValueError(
            f"decode_latents: latents must have shape [B, {channels}, h, w] with B, h, w >= 1, "
            f"got {list(latents.shape)}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"decode_latents: latents must be a float tensor, got {latents.dtype}")
    if latents.device != weight.device:
        raise ValueError(
            f"decode_latents: latents must be on the VAE's device ({weight.device}), got {latents.device}"
        )
    decoded = vae.decode(latents.to(weight.dtype) / vae.config.scaling_factor).sample
    image = (decoded / 2 + 0.5).clamp(
        0, 1
    )  # rounded in the VAE dtype, as the official pipeline does
    return (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
