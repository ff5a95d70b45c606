"""RoPE tables: the rotation they apply, built once per grid and kept outside the state dict; the
adaLN multiply-adds of the blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from sora_train.config import ModelConfig
from sora_train.models.attention import TokenLayout
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.models.dit import gated_residual, modulate
from sora_train.models.rope import RopeTable, TableCache, apply_rope, grid_positions, rope_angles, rope_table
from sora_train.models.wan import rope_tables


def pairwise_rotation(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The rotation written pair by pair, cos and sin taken of the angles on every call."""
    pairs = rearrange(x.float(), "b n l (k two) -> b n l k two", two=2)
    cos, sin = angles.cos(), angles.sin()
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rearrange(rotated, "b n l k two -> b n l (k two)").type_as(x)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=[1, 2, 2], text_dim=16,
                  text_depth=1, text_heads=2, text_vocab_size=128)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 5, 7)])
@pytest.mark.parametrize("dims", [None, (4, 10, 10)])
def test_table_rotation_equals_the_pairwise_formula_bit_for_bit(grid, dims):
    angles = rope_angles(grid_positions(grid), 24, dims=dims)  # (L, 12)
    x = torch.randn(2, 3, angles.shape[0], 24)
    table = rope_table(angles)
    assert table.cos.shape == table.sin.shape == (angles.shape[0], 24)
    assert table.cos.dtype == table.sin.dtype == torch.float32
    assert torch.equal(apply_rope(x, table), pairwise_rotation(x, angles))
    assert torch.equal(apply_rope(x, angles), apply_rope(x, table))  # angles are turned into a table
    half = x.to(torch.bfloat16)  # rotated in float32, returned in bf16
    rotated = apply_rope(half, table)
    assert rotated.dtype == torch.bfloat16 and torch.equal(rotated, pairwise_rotation(half, angles))


def test_wan_tables_rotate_as_the_shared_rotation():
    """Wan's (float64-derived) cos/sin, laid out as a `RopeTable`, rotate as Wan's own rotation."""
    from sora_train.models.wan import apply_wan_rope

    cos, sin = rope_tables((2, 3, 4), 16, 10000.0)  # (L, 8)
    table = RopeTable(cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), -1).flatten(-2))
    x = torch.randn(2, 2, 24, 16)
    assert torch.equal(apply_rope(x, table), apply_wan_rope(x, cos, sin))


def test_table_cache_keeps_the_most_recently_used():
    cache: TableCache[int] = TableCache(capacity=2)
    built = []

    def build(value: int):
        return lambda: built.append(value) or value

    assert [cache.get(key, build(key)) for key in ("a", "b", "a", "c", "a", "b")] == list("abacab")
    assert built == list("abcb")  # c pushed out b, the least recently used; a stayed
    assert list(cache.tables) == ["a", "b"]


@pytest.mark.parametrize("variant", ["cross_attention", "mmdit", "wan"])
def test_tables_are_built_once_per_grid_and_never_in_the_state_dict(variant):
    torch.manual_seed(0)
    cfg = tiny_config(variant=variant)
    model = build_denoiser(cfg)
    keys = list(model.state_dict())
    ids, mask = build_tokenizer(cfg)(["a red square", "x"])
    cache = model.dit.rope_cache
    with torch.inference_mode():  # a table first built while sampling still serves training
        model(torch.randn(2, 3, 2, 8, 8), torch.rand(2), ids, mask)
    (first,) = cache.tables.values()
    model(torch.randn(2, 3, 2, 8, 8), torch.rand(2), ids, mask).square().mean().backward()
    (again,) = cache.tables.values()
    assert all(a is b for a, b in zip(first, again, strict=True))  # not rebuilt
    model(torch.randn(2, 3, 4, 8, 12), torch.rand(2), ids, mask)
    assert len(cache.tables) == 2  # a new grid, a new table
    assert list(model.state_dict()) == keys and not any("rope" in key for key in keys)
    copied = copy.deepcopy(model)  # as the EMA copies a model: the copy keeps its own tables
    assert copied.dit.rope_cache is not cache and len(copied.dit.rope_cache.tables) == 2


class FirstHalf(TokenLayout):
    """A layout that keeps the first half of the tokens (as rank 0 of two would)."""

    degree = 2

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.narrow(dim, 0, -(-x.shape[dim] // 2))


def test_a_new_layout_gets_its_own_split_table():
    model = build_denoiser(tiny_config()).dit
    grid, device = (2, 4, 4), torch.device("cpu")
    whole = model.rope(grid, device)
    model.layout = FirstHalf()
    half = model.rope(grid, device)
    assert whole.cos.shape == (32, 16) and half.cos.shape == (16, 16)
    assert torch.equal(half.sin, whole.sin[:16])
    wan = build_denoiser(tiny_config(variant="wan")).dit
    cos, _ = wan.rope(grid, device)
    wan.layout = FirstHalf()
    assert torch.equal(wan.rope(grid, device)[0], cos[:16])


def test_modulate_and_gated_residual_are_the_adaln_formulas():
    x, update = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    shift, scale, gate = torch.randn(3, 2, 8)
    torch.testing.assert_close(
        modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None], rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        gated_residual(x, gate, update), x + gate[:, None] * update, rtol=1e-6, atol=1e-6
    )
