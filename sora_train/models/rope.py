"""3D rotary position embedding over the (f, h, w) token grid.

The head dimension K is split into three even parts, one per axis (time, height, width);
each part rotates by its own axis' integer position. Positions are plain integers, so any
grid size works, including grids larger than those seen in training.

The cos and sin of the angles are computed once per grid into a `RopeTable` and kept in a
`TableCache` on the model (a plain attribute, never a buffer: state dicts do not change); every
block's queries and keys are then rotated from the table in float32 by `apply_rope`: four
elementwise kernels in eager mode for float32 inputs (the same arithmetic as the pairwise form,
bit for bit), fused with the q/k norm into one kernel under torch.compile.
Shape legend: B batch, N heads, L = f·h·w tokens, K head dim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

import torch
from einops import rearrange, repeat

Table = TypeVar("Table")


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an (even) head dim into even (time, height, width) parts; time gets the remainder."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """Integer (t, y, x) positions of every token of a (f, h, w) grid in patch order: (L, 3)."""
    f, h, w = grid
    axes = [torch.arange(n, device=device) for n in (f, h, w)]
    mesh = torch.meshgrid(*axes, indexing="ij")  # three (f, h, w)
    return rearrange(torch.stack(mesh), "a f h w -> (f h w) a")


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dims: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Rotation angles for (L, 3) positions: (L, K/2), float32.

    `dims`: the (time, height, width) parts of the head dim, each even, summing to it; None: `axis_dims`.
    """
    dims = dims or axis_dims(head_dim)
    if sum(dims) != head_dim or any(d % 2 for d in dims):
        raise ValueError(f"RoPE axis dims {dims} must be even and sum to the head dim {head_dim}")
    parts = []
    for axis, dim in enumerate(dims):
        if dim == 0:
            continue
        freqs = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
        parts.append(positions[:, axis, None].float() * freqs)  # (L, dim/2)
    return torch.cat(parts, dim=-1)


def sincos_embedding(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Absolute sinusoidal embedding of (L, 3) positions: (L, dim), each axis a third of the dims."""
    parts = []
    for axis, axis_dim in enumerate(axis_dims(dim)):
        freqs = theta ** (
            -torch.arange(0, axis_dim, 2, device=positions.device, dtype=torch.float32) / axis_dim
        )
        angles = positions[:, axis, None].float() * freqs  # (L, axis_dim/2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


class RopeTable(NamedTuple):
    """The rotation of every token, ready to apply: two (L, K) float32 tables.

    Channel pair i = (2i, 2i+1) turns by angle i: `cos` holds cos(angle i) in both channels,
    `sin` holds -sin(angle i) in channel 2i and +sin(angle i) in channel 2i+1, so that the
    rotated pair is `x * cos + (x with each pair swapped) * sin`.
    """

    cos: torch.Tensor  # (L, K)
    sin: torch.Tensor  # (L, K)


def rope_table(angles: torch.Tensor) -> RopeTable:
    """The `RopeTable` of (L, K/2) angles (float32)."""
    cos, sin = angles.cos(), angles.sin()  # (L, K/2) each
    signed_sin = rearrange(torch.stack((-sin, sin), dim=-1), "l k two -> l (k two)")
    return RopeTable(repeat(cos, "l k -> l (k two)", two=2), signed_sin)


def apply_rope(x: torch.Tensor, table: RopeTable | torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, L, K) queries or keys by a (L, K) `RopeTable`, or by (L, K/2) angles (turned
    into a table first); adjacent channels (2i, 2i+1) are a pair turned by angle i.

    Computed in float32 and returned in x's dtype. In float32 it equals, bit for bit, the pairwise
    form (real·cos − imag·sin, real·sin + imag·cos)."""
    if not isinstance(table, RopeTable):
        table = rope_table(table)
    x32 = x.float()
    pairs = rearrange(x32, "b n l (k two) -> b n l k two", two=2)
    swapped = rearrange(pairs.flip(-1), "b n l k two -> b n l (k two)")  # (imag, real) in each pair
    return (x32 * table.cos + swapped * table.sin).type_as(x)


class TableCache(Generic[Table]):
    """The `capacity` most recently used tables, by key: a model keeps its RoPE tables here
    (a plain attribute, not a buffer, so it never enters a state dict).

    A key must name everything the table depends on (grid, head dim, theta, device, and the
    token layout when the table is split for sequence parallelism). Tables are built outside
    inference mode, so a table first built while sampling still serves training.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.tables: OrderedDict[Hashable, Table] = OrderedDict()

    @torch.compiler.disable
    def get(self, key: Hashable, build: Callable[[], Table]) -> Table:
        """The table under `key`, built by `build()` and kept when it is not there yet."""
        if key in self.tables:
            self.tables.move_to_end(key)
            return self.tables[key]
        with torch.inference_mode(False):
            table = build()
        self.tables[key] = table
        if len(self.tables) > self.capacity:
            self.tables.popitem(last=False)  # the least recently used
        return table
