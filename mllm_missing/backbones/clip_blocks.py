"""The block loop of open_clip's ViT and text towers, with prompts inserted (input or attention mode).

These functions reproduce open_clip's own pre- and post-processing around the transformer blocks
(``VisionTransformer.forward``, ``CLIP.encode_text`` / ``TextTransformer.forward``) so that a call
without prompts gives the numbers of ``encode_image`` / ``encode_text``, and add the prompt
insertion of `mllm_missing.backbones.base`. They read the towers' attributes at call time, so a
tower cast to another dtype after construction keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm_missing.backbones.base import LayerPrompts, PromptMode, prefix_attention
from mllm_missing.errors import ConfigError

__all__ = [
    "check_config",
    "check_model",
    "input_mode_mask",
    "run_blocks",
    "text_embed",
    "text_head",
    "text_tower",
    "vision_embed",
    "vision_head",
]


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text transformer's parts: the CLIP itself, or its ``text`` tower.

    `CLIP` keeps the text parts on itself; `CustomTextCLIP` keeps an open_clip `TextTransformer`
    in ``model.text`` (a Hugging Face text tower has no ``resblocks`` and is rejected by the caller).
    """
    text = getattr(model, "text", None)
    return text if isinstance(text, nn.Module) else model


def _text_pool_type(tower: nn.Module) -> str:
    pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    return str(pool_type)


def _text_eos_id(tower: nn.Module) -> int:
    eos = getattr(tower, "text_eos_id", None)
    eos = eos if eos is not None else getattr(tower, "eos_id", None)
    if eos is None:
        raise ConfigError("the text tower pools at its eos token but has no eos_id")
    return int(eos)


def check_config(config: Mapping[str, Any], name: str) -> None:
    """Raise `ConfigError` for a model config whose towers cannot run here, before building it.

    Checking the config first matters: building a Hugging Face text tower would try a download.
    """
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "timm_model_name" in vision or not isinstance(vision.get("layers", 12), int):
        raise ConfigError(
            f"{name}: CLIPBackbone runs open_clip's ViT image tower only (not ResNet or timm towers)"
        )
    if "hf_model_name" in text:
        raise ConfigError(f"{name}: Hugging Face text towers are not supported")
    if "multimodal_cfg" in config:
        raise ConfigError(f"{name}: CoCa models (multimodal_cfg) are not supported")


def check_model(model: nn.Module, name: str) -> None:
    """Raise `ConfigError` unless both towers of `model` can run block by block here."""
    visual = getattr(model, "visual", None)
    if not all(hasattr(visual, attr) for attr in ("class_embedding", "conv1", "transformer")):
        raise ConfigError(
            f"{name}: the image tower is a {type(visual).__name__}; CLIPBackbone runs open_clip's "
            "VisionTransformer only (not ResNet, timm or ConvNeXt towers)"
        )
    if getattr(visual, "attn_pool_contrastive", None) is not None:
        raise ConfigError(f"{name}: 'parallel'/'cascade' attentional pooling is not supported")
    text = text_tower(model)
    if not hasattr(getattr(text, "transformer", None), "resblocks"):
        raise ConfigError(
            f"{name}: the text tower is a {type(text).__name__}; CLIPBackbone runs open_clip's "
            "own text transformer only (not Hugging Face text towers)"
        )
    if getattr(text, "cls_emb", None) is not None:
        raise ConfigError(
            f"{name}: text towers with an appended class token (CoCa) are not supported"
        )


def vision_embed(visual: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, positional embedding, patch dropout and ``ln_pre``."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    out: torch.Tensor = visual.ln_pre(x)
    return out


def vision_head(visual: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool and project the final states of the real tokens, as open_clip's ``_pool`` + ``proj``.

    Returns:
        (pooled (batch, output_dim), tokens (batch, L, width)): the token states go through
        ``ln_post`` where it works at the transformer's width (not with attentional pooling).
    """
    if visual.attn_pool is not None:
        tokens = x
        pooled = _global_pool(visual.pool_type, visual.ln_post(visual.attn_pool(x)))
    elif getattr(visual, "final_ln_after_pool", False):
        pooled = visual.ln_post(_global_pool(visual.pool_type, x))
        tokens = visual.ln_post(x)
    else:
        tokens = visual.ln_post(x)
        pooled = _global_pool(visual.pool_type, tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens


def _global_pool(pool_type: str, x: torch.Tensor) -> torch.Tensor:
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)
    if pool_type == "tok":
        return x[:, 0]
    return x


def text_embed(tower: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token and positional embeddings, and the additive attention mask the tower uses.

    Returns:
        (x (batch, L, width), mask): mask is None (bidirectional), the causal (L, L) mask, or
        (batch * heads, L, L) where the tower also masks padding.
    """
    cast_dtype = tower.transformer.get_cast_dtype()
    length = ids.shape[1]
    x = tower.token_embedding(ids).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    mask = tower.attn_mask
    if mask is not None:
        mask = mask[:length, :length]
    if getattr(tower, "use_pad_mask", False):
        pad = torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
        pad = pad.masked_fill(ids == tower.pad_id, float("-inf"))[:, None, :]
        pad = pad.expand(-1, length, -1).repeat_interleave(tower.heads, 0)
        mask = pad if mask is None else mask.to(x.dtype).unsqueeze(0) + pad
    return x, mask


def text_head(tower: Any, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ln_final``, pooling (argmax = the EOT token, eos, first or last) and ``text_projection``.

    Returns:
        (pooled (batch, embed_dim), tokens (batch, L, width) after ``ln_final``).
    """
    tokens = tower.ln_final(x)
    pool_type = _text_pool_type(tower)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if pool_type == "first":
        pooled = tokens[:, 0]
    elif pool_type == "last":
        pooled = tokens[:, -1]
    elif pool_type == "argmax":
        pooled = tokens[rows, ids.argmax(dim=-1)]
    elif pool_type == "eos":
        pooled = tokens[rows, ids.eq(_text_eos_id(tower)).int().argmax(dim=-1)]
    else:
        pooled = tokens
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        pooled = projection(pooled)
    elif projection is not None:
        pooled = pooled @ projection
    return pooled, tokens


def input_mode_mask(
    base: torch.Tensor | None,
    active: torch.Tensor,
    length: int,
    heads: int,
    *,
    prompts_first: bool,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive attention mask over ``length`` real tokens and P prompt positions.

    Real tokens keep `base` among themselves and attend to the active prompt positions only.
    Prompt positions attend to the active prompt positions (the earlier ones in a `causal`
    tower) and always to themselves, so no row is fully masked; in a `causal` tower, where they
    come first, they do not see the real tokens (which follow them).

    Args:
        base: the tower's mask among real tokens: None, (L, L) or (batch * heads, L, L).
        active: bool (batch, P) active prompt positions.
        length: L, the number of real tokens.
        heads: attention heads of the tower.
        prompts_first: prompts sit before the real tokens (else after them).
        causal: the tower is causal.
        dtype: the mask's dtype (the tower's).

    Returns:
        (batch * heads, L + P, L + P) additive mask for ``nn.MultiheadAttention``.
    """
    batch, count = active.shape
    size = length + count
    neg = float("-inf")
    real = slice(count, size) if prompts_first else slice(0, length)
    prompt = slice(0, count) if prompts_first else slice(length, size)
    if base is None:
        base = torch.zeros(length, length, dtype=dtype, device=active.device)
    base = base.to(dtype=dtype, device=active.device)
    base = base[None, None] if base.ndim == 2 else base.view(batch, heads, length, length)
    mask = torch.zeros(batch, base.shape[1], size, size, dtype=dtype, device=active.device)
    mask[:, :, real, real] = base
    columns = torch.zeros(batch, count, dtype=dtype, device=active.device)
    mask[:, :, :, prompt] += columns.masked_fill(~active, neg)[:, None, None, :]
    if causal:
        mask[:, :, prompt, real] = neg
        upper = torch.full((count, count), neg, dtype=dtype, device=active.device).triu(1)
        mask[:, :, prompt, prompt] += upper
    mask[:, :, prompt, prompt].diagonal(dim1=-2, dim2=-1).zero_()
    return mask.expand(batch, heads, size, size).reshape(batch * heads, size, size)


def _adapted_out_proj(block: nn.Module) -> bool:
    """Whether `block`'s ``nn.MultiheadAttention`` has an adapter (peft) layer as ``out_proj``.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly instead of calling the module,
    so such a wrapper would be silently bypassed: these blocks run their attention here.
    """
    attn = getattr(block, "attn", None)
    return isinstance(attn, nn.MultiheadAttention) and hasattr(attn.out_proj, "base_layer")


def _call_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool):
    if _adapted_out_proj(block):
        return _attention_block(block, x, mask, None, None, None, -1)  # x is batch first here
    if batch_first:
        out: torch.Tensor = block(x, attn_mask=mask)
        return out
    out = block(x.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def _check_attention_block(block: nn.Module, index: int) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    if (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
    ):
        return attn
    raise ConfigError(
        f"attention-mode prompts need blocks with a plain nn.MultiheadAttention; block {index} "
        f"is a {type(block).__name__}; use input-mode prompts with this model"
    )


def _attention_block(
    block: Any,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    keys: torch.Tensor | None,
    values: torch.Tensor | None,
    active: torch.Tensor | None,
    index: int,
) -> torch.Tensor:
    """One residual block with the prefix-prompt term added to each head's attention output.

    With no `keys` it is the plain block (used when ``out_proj`` carries an adapter).
    """
    attn = _check_attention_block(block, index)
    batch, length, width = x.shape
    heads = attn.num_heads
    hidden = block.ln_1(x)
    q, k, v = F.linear(hidden, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(q.dtype)
        if mask.ndim == 3:
            mask = mask.view(batch, heads, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if keys is not None and values is not None and active is not None:
        out = out + prefix_attention(q, keys, values, active)
    out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    x = x + block.ls_1(out)
    result: torch.Tensor = x + block.ls_2(block.mlp(block.ln_2(x)))
    return result


def run_blocks(
    transformer: Any,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: LayerPrompts | None,
    *,
    prompts_first: bool,
    causal: bool,
) -> torch.Tensor:
    """Run ``transformer.resblocks`` over `x` (batch, L, width), inserting `prompts`.

    Input mode: at the first prompted block the prompt positions join the sequence (before the
    real tokens if `prompts_first`, else after); at each later prompted block their states are
    replaced by that block's tokens; they are dropped after the last block. Attention mode: each
    prompted block runs its attention here and adds `prefix_attention` before ``out_proj``.

    Returns:
        (batch, L, width): the final states of the real tokens.
    """
    blocks = transformer.resblocks
    batch_first = getattr(transformer, "batch_first", True)
    if prompts is None:
        for block in blocks:
            x = _call_block(block, x, mask, batch_first)
        return x
    if prompts.mode is PromptMode.ATTENTION:
        for index, block in enumerate(blocks):
            if index in prompts.tokens:
                pair = prompts.tokens[index]
                active = prompts.active(index).to(x.device)
                x = _attention_block(block, x, mask, pair[:, 0], pair[:, 1], active, index)
            else:
                x = _call_block(block, x, mask, batch_first)
        return x

    length, count = x.shape[1], prompts.length
    real = slice(count, count + length) if prompts_first else slice(0, length)
    heads = blocks[0].attn.num_heads
    joined = False  # whether the prompt positions are in the sequence
    joint_mask: torch.Tensor | None = None
    for index, block in enumerate(blocks):
        if index in prompts.tokens:
            tokens = prompts.tokens[index].to(device=x.device, dtype=x.dtype)
            states = x[:, real] if joined else x
            x = torch.cat([tokens, states] if prompts_first else [states, tokens], dim=1)
            active = prompts.active(index).to(x.device)
            # Every position attending to every other (a bidirectional tower, every prompt
            # active: MAP's case) needs no mask, which keeps the fused attention kernels and
            # skips a (batch * heads, L + P, L + P) mask per prompted block.
            unmasked = mask is None and not causal and bool(active.all())
            joint_mask = (
                None
                if unmasked
                else input_mode_mask(
                    mask,
                    active,
                    length,
                    heads,
                    prompts_first=prompts_first,
                    causal=causal,
                    dtype=x.dtype,
                )
            )
            joined = True
        x = _call_block(block, x, joint_mask if joined else mask, batch_first)
    return x[:, real] if joined else x
