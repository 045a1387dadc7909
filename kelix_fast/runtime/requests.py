"""Request validation and prompt layout: plain functions shared by ``KelixAR.generate``, ``Engine.add_request``
and the scoring entry points, so every path checks the same things with the same messages, before any
compute. Each raises ``ValueError``/``TypeError`` naming the caller's argument and the expected value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kelix_fast.arguments import check_finite, check_seed, describe, is_int
from kelix_fast.config import KelixARConfig
from kelix_fast.runtime.block_selection import SEED_BITS
from kelix_fast.runtime.sampling import SamplingParams


def check_images(
    config: KelixARConfig, pixel_values: object, image_grid_thw: object
) -> list[tuple[int, int, int]]:
    """[N, C, p, p] float patches and their [n, 3] ``(1, h, w)`` grids -> the grids as tuples."""
    vision = config.tokenizer.vision_config
    p = vision.patch_size
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a float tensor, got dtype {pixel_values.dtype}")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (vision.num_channels, p, p):
        raise ValueError(
            f"pixel_values must have shape [N, {vision.num_channels}, {p}, {p}], "
            f"got {list(pixel_values.shape)}"
        )
    check_finite("pixel_values", pixel_values)
    if isinstance(image_grid_thw, torch.Tensor):
        if image_grid_thw.is_floating_point() or image_grid_thw.is_complex():
            raise ValueError(
                f"image_grid_thw must be an integer tensor, got {image_grid_thw.dtype}"
            )
        grid_list = image_grid_thw.tolist()
    elif isinstance(image_grid_thw, Sequence):
        grid_list = [list(g) for g in image_grid_thw]
    else:
        raise TypeError(
            f"image_grid_thw must be a tensor [n, 3], got {type(image_grid_thw).__name__}"
        )
    if not grid_list or any(len(g) != 3 for g in grid_list):
        raise ValueError(f"image_grid_thw must have shape [n >= 1, 3], got {grid_list}")
    grids = []
    for i, (t, h, w) in enumerate(grid_list):
        if t != 1:
            raise ValueError(f"image_grid_thw[{i}] must have t = 1 (images), got {t}")
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(
                f"image_grid_thw[{i}] = (t, h, w) = ({t}, {h}, {w}): h and w must be even and >= 2 "
                "(2x2 patch merge)"
            )
        grids.append((int(t), int(h), int(w)))
    patches = sum(t * h * w for t, h, w in grids)
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes {patches} "
            f"(sum of t*h*w over {grid_list})"
        )
    return grids


def check_prompts(
    config: KelixARConfig, prompt_ids: object, *, arg: str, device: torch.device
) -> list[torch.Tensor]:
    """[B, L] tensor or a list of 1-D id sequences -> list of 1-D int64 tensors on ``device``."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"{arg} must have shape [B, L], got {list(prompt_ids.shape)}")
        rows = list(prompt_ids)
    elif isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, (str, bytes)):
        rows = [_prompt_row(config, r, arg=f"{arg}[{b}]") for b, r in enumerate(prompt_ids)]
    else:
        raise TypeError(
            f"{arg} must be a [B, L] int64 tensor or a list of id lists, got {type(prompt_ids).__name__}"
        )
    if not rows:
        raise ValueError(f"{arg} must hold at least one prompt, got B = 0")
    llm = config.llm
    out = []
    for b, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"{arg}[{b}] is empty: every prompt needs at least one token")
        if row.dim() != 1 or row.is_floating_point() or row.dtype == torch.bool:
            raise ValueError(
                f"{arg}[{b}] must be a 1-D integer sequence, got {row.dtype} {list(row.shape)}"
            )
        bad = (row < 0) | (row >= llm.vocab_size)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise _not_text_id(config, f"{arg}[{b}]", int(row[i]), i)
        if row.numel() > llm.max_seq_len:
            raise ValueError(
                f"{arg}[{b}] has {row.numel()} tokens, longer than the model's maximum context "
                f"max_seq_len = {llm.max_seq_len}"
            )
        out.append(row.to(device=device, dtype=torch.int64))
    return out


def _prompt_row(config: KelixARConfig, row: object, *, arg: str) -> torch.Tensor:
    """One prompt of a list -> a tensor: a tensor or numpy array as it is (:func:`check_prompts`
    checks its dtype), a sequence of ints as int64. A float, str, None, bool or nested list among
    the ids raises TypeError naming its position: torch would round a float, take a bool as 0/1 and
    fail on the others with a message about tensors."""
    if isinstance(row, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(row)
    if not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
        raise TypeError(f"{arg} must be a sequence of int token ids, got {describe(row)}")
    for i, token in enumerate(row):
        if not is_int(token):
            raise TypeError(f"{arg} must hold int token ids, got {describe(token)} at position {i}")
        if not 0 <= token < config.llm.vocab_size:  # before int64 could overflow
            raise _not_text_id(config, arg, int(token), i)
    return torch.tensor([int(t) for t in row], dtype=torch.int64)


def _not_text_id(config: KelixARConfig, arg: str, value: int, position: int) -> ValueError:
    return ValueError(
        f"{arg} must hold text ids in [0, {config.llm.vocab_size}), got {value} at position {position}"
    )


def aliased(name: str, value: Any, alias: str, alias_value: Any) -> tuple[Any, str]:
    """An argument that also goes by its transformers name (``input_ids`` for ``prompt_ids``,
    ``max_new_tokens`` for ``max_new_blocks``): (the value given, the name it was given under).
    Raises ValueError when both or neither are given."""
    if value is not None and alias_value is not None:
        raise ValueError(f"give {name} or {alias} (its transformers name), not both")
    if value is None and alias_value is None:
        raise ValueError(f"{name} (or its transformers name {alias}) must be given")
    return (value, name) if value is not None else (alias_value, alias)


def unpad_prompts(prompt_ids: object, attention_mask: object, *, arg: str) -> list[torch.Tensor]:
    """A padded [B, L] batch and its [B, L] ``attention_mask`` (1 on prompt tokens, one run per row:
    the padding on the left or on the right, as a transformers processor makes it) -> the B prompts
    without their padding. The engine has no padding mask: a padded position would be a real token."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ValueError(
            f"attention_mask goes with a [B, L] {arg} tensor, got {arg} of type "
            f"{type(prompt_ids).__name__}"
            + (f" {list(prompt_ids.shape)}" if isinstance(prompt_ids, torch.Tensor) else "")
        )
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of {arg} {list(prompt_ids.shape)}, "
            f"got {list(attention_mask.shape)}"
        )
    if attention_mask.is_complex() or bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0/1 (or bool) values")
    prompts = []
    for b, (row, keep) in enumerate(zip(prompt_ids, attention_mask.ne(0))):
        where = torch.nonzero(keep).flatten()
        if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError(
                f"attention_mask[{b}] must be one run of 1s (padding on the left or the right), "
                f"got {keep.int().tolist()}"
            )
        prompts.append(row[keep])
    return prompts


def expand_prompts(
    config: KelixARConfig,
    prompts: list[torch.Tensor],
    image_ids: torch.Tensor | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """Text prompts -> [L, G+1] groups, the k-th image placeholder (in order) filled with image_ids[k]."""
    llm = config.llm
    placeholders = [torch.nonzero(p == llm.image_token_id).flatten() for p in prompts]
    wanted = sum(int(p.numel()) for p in placeholders)
    if image_ids is not None:
        if not isinstance(image_ids, torch.Tensor):
            raise TypeError(f"image_ids must be a torch.Tensor, got {type(image_ids).__name__}")
        if (
            image_ids.dim() != 2
            or image_ids.shape[1] != llm.n_q_tokens
            or image_ids.dtype != torch.int64
        ):
            raise ValueError(
                f"image_ids must be int64 of shape [n_tok, {llm.n_q_tokens}], "
                f"got {image_ids.dtype} {list(image_ids.shape)}"
            )
        check_placeholders(config, wanted, image_ids.shape[0])
        bad = (image_ids < llm.vocab_size) | (image_ids >= llm.total_vocab)
        if bool(bad.any()):
            raise ValueError(
                f"image_ids must hold visual ids in [{llm.vocab_size}, {llm.total_vocab}), "
                f"got {int(image_ids[bad][0])}"
            )
        image_ids = image_ids.to(device)
    groups, used = [], 0
    for p, where in zip(prompts, placeholders):
        g = torch.full(
            (p.shape[0], llm.group_size), llm.q_eos_token, dtype=torch.int64, device=device
        )
        g[:, 0] = p
        if image_ids is None:
            g[where, :-1] = llm.image_token_id
        else:
            g[where, :-1] = image_ids[used : used + where.numel()]
            used += where.numel()
        groups.append(g)
    return groups


def check_placeholders(config: KelixARConfig, placeholders: int, image_tokens: int) -> None:
    if placeholders != image_tokens:
        raise ValueError(
            f"the prompt has {placeholders} image placeholders (id {config.llm.image_token_id}) "
            f"but the images give {image_tokens} tokens (image_ids rows): one merged image token "
            "per placeholder is required"
        )


def check_groups(config: KelixARConfig, groups: object, device: torch.device) -> torch.Tensor:
    """[B, L, G+1] int64 groups with ids in range -> on ``device``."""
    llm = config.llm
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor, got {type(groups).__name__}")
    if groups.dim() != 3 or groups.shape[-1] != llm.group_size or groups.dtype != torch.int64:
        raise ValueError(
            f"groups must be int64 of shape [B, L, {llm.group_size}], got {groups.dtype} {list(groups.shape)}"
        )
    if groups.shape[0] == 0 or groups.shape[1] == 0:
        raise ValueError(f"groups must hold at least one position, got shape {list(groups.shape)}")
    if groups.shape[1] > llm.max_seq_len:
        raise ValueError(
            f"groups has {groups.shape[1]} positions, longer than max_seq_len = {llm.max_seq_len}"
        )
    bad = (groups < 0) | (groups >= llm.total_vocab)
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"groups must hold ids in [0, {llm.total_vocab}), got {int(groups[where])} at {list(where)}"
        )
    return groups.to(device)


def per_request(name: str, value: Any, batch: int) -> list[Any]:
    """One value for every request, or a sequence of exactly ``batch`` values (SamplingParams checks
    the values themselves)."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(
            f"{name} must be one value or {batch} values (one per request), got {len(value)} values"
        )
    return list(value)


def per_request_params(batch: int, *, temperature, top_k, top_p) -> list[SamplingParams]:
    temperatures = per_request("temperature", temperature, batch)
    top_ks = per_request("top_k", top_k, batch)
    top_ps = per_request("top_p", top_p, batch)
    return [SamplingParams(t, k, p) for t, k, p in zip(temperatures, top_ks, top_ps)]


def request_seeds(seed: object, batch: int, *, name: str = "seed") -> list[int]:
    """Each request's seed in [0, 2^31) (:data:`SEED_BITS`: a draw's seed packs it with its block and
    slot); None draws them from torch's global RNG. ``seed``: None, one int for every request, or a
    list of ``batch`` ints."""
    if seed is None:
        return torch.randint(2**SEED_BITS, (batch,)).tolist()
    if is_int(seed) or not isinstance(seed, Sequence) or isinstance(seed, str):
        return [check_seed(name, seed, bits=SEED_BITS)] * batch
    if len(seed) != batch:
        raise ValueError(
            f"{name} must be None, an int or a list of {batch} ints (one per request), "
            f"got {seed!r:.100}"
        )
    return [check_seed(f"{name}[{b}]", s, bits=SEED_BITS) for b, s in enumerate(seed)]
