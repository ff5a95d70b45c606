"""The Wan transformer's two published layouts: diffusers' names and the original Wan release's names.

Our `WanTransformer` (`models/wan.py`) names its parameters exactly as diffusers'
`WanTransformer3DModel`; this module maps them to and from the original release
(`Wan-Video/Wan2.1` `WanModel`), and reads either layout's config.json into `ModelConfig` fields.

The mapping renames modules and never changes a tensor. One trap: the original calls the
cross-attention's affine norm `norm3` and the FFN's parameter-free norm `norm2`; diffusers swaps them.

Names (original  <->  diffusers), per block N where it says `blocks.N.`:

    patch_embedding                   patch_embedding
    time_embedding.0 / .2             condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                 condition_embedder.time_proj
    text_embedding.0 / .2             condition_embedder.text_embedder.linear_1 / linear_2
    img_emb.proj.0 / .1 / .3 / .4     condition_embedder.image_embedder.norm1 / ff.net.0.proj / ff.net.2 / norm2
    img_emb.emb_pos                   condition_embedder.image_embedder.pos_embed   (FLF2V)
    blocks.N.self_attn.q/k/v/o        blocks.N.attn1.to_q/to_k/to_v/to_out.0
    blocks.N.self_attn.norm_q/norm_k  blocks.N.attn1.norm_q/norm_k
    blocks.N.cross_attn.(same)        blocks.N.attn2.(same)
    blocks.N.cross_attn.k_img/v_img   blocks.N.attn2.add_k_proj/add_v_proj          (I2V)
    blocks.N.cross_attn.norm_k_img    blocks.N.attn2.norm_added_k                   (I2V)
    blocks.N.norm3                    blocks.N.norm2   (cross-attention norm, affine)
    blocks.N.ffn.0 / .2               blocks.N.ffn.net.0.proj / ffn.net.2
    blocks.N.modulation               blocks.N.scale_shift_table   (1, 6, D)
    head.head                         proj_out
    head.modulation                   scale_shift_table            (1, 2, D)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.denoiser import wan_shape
from ..models.rope import axis_dims

# Module (or whole-parameter) names outside the blocks: original -> diffusers.
_TOP: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
# Inside `blocks.N.`: original -> diffusers.
_BLOCK: dict[str, str] = {
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"))},
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.o": "attn2.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm1": "norm1",
    "norm3": "norm2",  # the cross-attention norm: the DESIGN.md trap
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
_TOP_BACK = {d: o for o, d in _TOP.items()}
_BLOCK_BACK = {d: o for o, d in _BLOCK.items()}
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

# The original release fixes what diffusers makes configurable.
ORIGINAL_IMAGE_DIM = 1280  # CLIP ViT-H/14 features (MLPProj(1280, dim))
ORIGINAL_FLF_POSITIONS = 257 * 2  # FLF2V: two images' CLIP tokens
ORIGINAL_ROPE_MAX_SEQ_LEN = 1024
ORIGINAL_MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
ORIGINAL_TEXT_LEN = 512  # umT5 tokens the original pads prompts to
ORIGINAL_CLASS = "WanModel"  # `_class_name` of the original release's config.json
DIFFUSERS_CLASS = "WanTransformer3DModel"


class PretrainedFormatError(ValueError):
    """A folder, file or config that is not a Wan transformer we can read or write (one clear line)."""


class UnknownWeightName(PretrainedFormatError):
    """A weight name that has no counterpart in the other layout."""


def _rename(name: str, top: Mapping[str, str], block: Mapping[str, str], layout: str) -> str:
    """`name` with its longest known module prefix renamed (the parameter's leaf name kept)."""
    match = _BLOCK_NAME.match(name)
    table, rest, head = (block, match[2], f"blocks.{match[1]}.") if match else (top, name, "")
    parts = rest.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in table:
            return head + ".".join([table[module], *parts[cut:]])
    raise UnknownWeightName(f"{name!r} is not a Wan transformer weight in the {layout} layout")


def original_to_diffusers_name(name: str) -> str:
    """The diffusers name of an original-Wan weight name (raises UnknownWeightName)."""
    return _rename(name, _TOP, _BLOCK, "original Wan")


def diffusers_to_original_name(name: str) -> str:
    """The original-Wan name of a diffusers weight name (raises UnknownWeightName)."""
    return _rename(name, _TOP_BACK, _BLOCK_BACK, "diffusers")


def original_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-Wan state dict renamed to diffusers' names (same tensor objects)."""
    return {original_to_diffusers_name(name): tensor for name, tensor in state.items()}


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers state dict renamed to the original Wan names (same tensor objects)."""
    return {diffusers_to_original_name(name): tensor for name, tensor in state.items()}


class WanConfigError(PretrainedFormatError):
    """A config.json that does not describe a Wan transformer we can read or write."""


def _required(config: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if config.get(key) is None]
    if missing:
        raise WanConfigError(f"{where} lacks {', '.join(missing)}")


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[arg-type]


def diffusers_architecture(config: Mapping[str, Any], where: str = "config.json") -> dict[str, object]:
    """ModelConfig fields (plus `out_channels`) from a diffusers WanTransformer3DModel config.json.

    Keys absent from the file take the defaults of `WanTransformer3DModel.__init__`.
    """
    shape_keys = ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "in_channels")
    _required(config, (*shape_keys, "text_dim", "freq_dim"), where)
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    return {
        "hidden_size": heads * head_dim,
        "num_heads": heads,
        "depth": int(config["num_layers"]),
        "ffn_dim": int(config["ffn_dim"]),
        "freq_dim": int(config["freq_dim"]),
        "patch_size": [int(p) for p in config.get("patch_size", (1, 2, 2))],
        "in_channels": int(config["in_channels"]),
        "out_channels": int(config.get("out_channels") or config["in_channels"]),
        "text_dim": int(config["text_dim"]),
        "norm_eps": float(config.get("eps", 1e-6)),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        # diffusers >= 0.33 always builds the q/k RMSNorms (the config's qk_norm string is not read)
        "qk_norm": True,
        "image_dim": _optional_int(config.get("image_dim")),
        "added_kv_proj_dim": _optional_int(config.get("added_kv_proj_dim")),
        "rope_max_seq_len": int(config.get("rope_max_seq_len", 1024)),
        "pos_embed_seq_len": _optional_int(config.get("pos_embed_seq_len")),
        "rope_theta": 10000.0,
        "rope_axis_dims": list(axis_dims(head_dim)),
    }


def original_architecture(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str = "config.json"
) -> dict[str, object]:
    """ModelConfig fields (plus `out_channels`) of an original-Wan folder.

    `config` is its config.json (`WanModel`'s arguments; absent keys take WanModel's defaults);
    `shapes` maps its ORIGINAL weight names to shapes, for what the config does not say: whether
    there is a CLIP image embedding (`img_emb`, Wan 2.1 I2V/FLF2V; Wan 2.2 I2V has none although
    its model_type is also i2v) and the FLF2V positions.
    """
    _required(config, ("dim", "num_heads", "num_layers", "ffn_dim", "freq_dim", "in_dim", "out_dim"), where)
    model_type = config.get("model_type", "t2v")
    if model_type not in ORIGINAL_MODEL_TYPES:
        raise WanConfigError(
            f"{where}: model_type {model_type!r} is not supported; choose one of {', '.join(ORIGINAL_MODEL_TYPES)}"
        )
    if list(config.get("window_size", (-1, -1))) != [-1, -1]:
        raise WanConfigError(
            f"{where}: window_size {config['window_size']} (local attention) is not supported"
        )
    dim = int(config["dim"])
    image = shapes.get("img_emb.proj.0.weight")
    positions = shapes.get("img_emb.emb_pos")
    return {
        "hidden_size": dim,
        "num_heads": int(config["num_heads"]),
        "depth": int(config["num_layers"]),
        "ffn_dim": int(config["ffn_dim"]),
        "freq_dim": int(config["freq_dim"]),
        "patch_size": [int(p) for p in config.get("patch_size", (1, 2, 2))],
        "in_channels": int(config["in_dim"]),
        "out_channels": int(config["out_dim"]),
        "text_dim": int(config.get("text_dim", 4096)),
        "norm_eps": float(config.get("eps", 1e-6)),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": bool(config.get("qk_norm", True)),
        "image_dim": int(image[0]) if image else None,
        "added_kv_proj_dim": dim if image else None,
        "rope_max_seq_len": ORIGINAL_ROPE_MAX_SEQ_LEN,
        "pos_embed_seq_len": int(positions[1]) if positions else None,
        "rope_theta": 10000.0,
        "rope_axis_dims": list(axis_dims(dim // int(config["num_heads"]))),
    }


# The ModelConfig fields a Wan folder fixes, in the order a mismatch is reported. (A `variant=wan`
# config also keeps qk_norm=true and rope_axis_dims unset, as both layouts do; ModelConfig checks that.)
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_heads", "depth", "ffn_dim", "freq_dim", "patch_size", "in_channels", "text_dim",
    "norm_eps", "cross_attn_norm", "image_dim", "added_kv_proj_dim", "rope_max_seq_len",
    "pos_embed_seq_len", "rope_theta",
)  # fmt: skip


def model_architecture(cfg: Any) -> dict[str, object]:
    """The architecture a `variant=wan` ModelConfig describes, as `diffusers_architecture` gives a
    folder's: the values its `WanTransformer` is built with (`ffn_dim` and `in_channels` resolved),
    `out_channels` (the latent space's channels), `qk_norm` and the RoPE split."""
    shape = wan_shape(cfg)
    arch: dict[str, object] = {name: getattr(shape, name) for name in ARCHITECTURE_FIELDS}
    arch["patch_size"] = [int(p) for p in shape.patch_size]
    arch |= {"out_channels": shape.out_channels, "qk_norm": bool(cfg.qk_norm)}
    arch["rope_axis_dims"] = list(cfg.rope_axis_dims or axis_dims(shape.head_dim))
    return arch


def _check_expressible(arch: Mapping[str, object], layout: str) -> None:
    """Reject what neither Wan layout can hold: another RoPE, or no q/k norms in diffusers."""
    head_dim = int(arch["hidden_size"]) // int(arch["num_heads"])  # type: ignore[call-overload]
    if float(arch["rope_theta"]) != 10000.0:  # type: ignore[arg-type]
        raise WanConfigError(
            f"the {layout} layout fixes rope_theta=10000, got model.rope_theta={arch['rope_theta']}"
        )
    if list(arch["rope_axis_dims"]) != list(axis_dims(head_dim)):  # type: ignore[call-overload]
        raise WanConfigError(
            f"the {layout} layout splits the head dim {head_dim} as {list(axis_dims(head_dim))} for RoPE, "
            f"got model.rope_axis_dims={arch['rope_axis_dims']}"
        )
    if layout == "diffusers" and not arch["qk_norm"]:
        raise WanConfigError(
            "the diffusers layout always has q/k norms; model.qk_norm=false cannot be written"
        )


def diffusers_config(arch: Mapping[str, object], diffusers_version: str) -> dict[str, object]:
    """The config.json diffusers' `WanTransformer3DModel.from_pretrained` reads, for an architecture
    (`model_architecture`); `pos_embed_seq_len` is written only when set (older diffusers lack it)."""
    _check_expressible(arch, "diffusers")
    heads = int(arch["num_heads"])  # type: ignore[call-overload]
    config: dict[str, object] = {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": diffusers_version,
        "added_kv_proj_dim": arch["added_kv_proj_dim"],
        "attention_head_dim": int(arch["hidden_size"]) // heads,  # type: ignore[call-overload]
        "cross_attn_norm": bool(arch["cross_attn_norm"]),
        "eps": float(arch["norm_eps"]),  # type: ignore[arg-type]
        "ffn_dim": arch["ffn_dim"],
        "freq_dim": arch["freq_dim"],
        "image_dim": arch["image_dim"],
        "in_channels": arch["in_channels"],
        "num_attention_heads": heads,
        "num_layers": arch["depth"],
        "out_channels": arch["out_channels"],
        "patch_size": list(arch["patch_size"]),  # type: ignore[call-overload]
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": arch["rope_max_seq_len"],
        "text_dim": arch["text_dim"],
    }
    if arch["pos_embed_seq_len"] is not None:
        config["pos_embed_seq_len"] = arch["pos_embed_seq_len"]
    return config


def original_config(arch: Mapping[str, object], diffusers_version: str) -> dict[str, object]:
    """The config.json of the original release's `WanModel` for an architecture (`model_architecture`).

    The original fixes the CLIP width (1280), the image key/value width (= hidden size), the FLF2V
    positions (514) and the RoPE table (1024); another value cannot be written in this layout.
    """
    _check_expressible(arch, "original Wan")
    fixed = {"rope_max_seq_len": ORIGINAL_ROPE_MAX_SEQ_LEN}
    if arch["image_dim"] is not None:
        fixed |= {"image_dim": ORIGINAL_IMAGE_DIM, "added_kv_proj_dim": arch["hidden_size"]}
        if arch["pos_embed_seq_len"] is not None:
            fixed["pos_embed_seq_len"] = ORIGINAL_FLF_POSITIONS
    elif arch["added_kv_proj_dim"] is not None or arch["pos_embed_seq_len"] is not None:
        fixed |= {"added_kv_proj_dim": None, "pos_embed_seq_len": None}
    for name, value in fixed.items():
        if arch[name] != value:
            raise WanConfigError(
                f"the original Wan layout fixes {name}={value}, got model.{name}={arch[name]}"
            )
    if arch["image_dim"] is not None:
        model_type = "flf2v" if arch["pos_embed_seq_len"] is not None else "i2v"
    else:  # Wan 2.2 I2V has no CLIP branch; its extra input channels carry the image latents
        model_type = "i2v" if arch["in_channels"] != arch["out_channels"] else "t2v"
    return {
        "_class_name": ORIGINAL_CLASS,
        "_diffusers_version": diffusers_version,
        "model_type": model_type,
        "patch_size": list(arch["patch_size"]),  # type: ignore[call-overload]
        "text_len": ORIGINAL_TEXT_LEN,
        "in_dim": arch["in_channels"],
        "dim": arch["hidden_size"],
        "ffn_dim": arch["ffn_dim"],
        "freq_dim": arch["freq_dim"],
        "text_dim": arch["text_dim"],
        "out_dim": arch["out_channels"],
        "num_heads": arch["num_heads"],
        "num_layers": arch["depth"],
        "window_size": [-1, -1],
        "qk_norm": bool(arch["qk_norm"]),
        "cross_attn_norm": bool(arch["cross_attn_norm"]),
        "eps": float(arch["norm_eps"]),  # type: ignore[arg-type]
    }


def expected_shapes(arch: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Every weight of the Wan transformer an architecture describes, by diffusers name, with its shape.

    Shape legend: D hidden size, F FFN width, T text width, Q time-frequency width, I CLIP width,
    A image key/value width, P FLF2V positions.
    """
    d, f, t, q = (int(arch[k]) for k in ("hidden_size", "ffn_dim", "text_dim", "freq_dim"))  # type: ignore[call-overload]
    patch = tuple(int(p) for p in arch["patch_size"])  # type: ignore[attr-defined]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def layer_norm(name: str, n: int) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (n,)

    shapes["patch_embedding.weight"] = (d, int(arch["in_channels"]), *patch)  # type: ignore[call-overload]
    shapes["patch_embedding.bias"] = (d,)
    linear("condition_embedder.time_embedder.linear_1", d, q)
    linear("condition_embedder.time_embedder.linear_2", d, d)
    linear("condition_embedder.time_proj", 6 * d, d)
    linear("condition_embedder.text_embedder.linear_1", d, t)
    linear("condition_embedder.text_embedder.linear_2", d, d)
    if arch["image_dim"] is not None:
        i, image = int(arch["image_dim"]), "condition_embedder.image_embedder"  # type: ignore[call-overload]
        layer_norm(f"{image}.norm1", i)
        linear(f"{image}.ff.net.0.proj", i, i)
        linear(f"{image}.ff.net.2", d, i)
        layer_norm(f"{image}.norm2", d)
        if arch["pos_embed_seq_len"] is not None:
            shapes[f"{image}.pos_embed"] = (1, int(arch["pos_embed_seq_len"]), i)  # type: ignore[call-overload]
    for n in range(int(arch["depth"])):  # type: ignore[call-overload]
        shapes |= {f"blocks.{n}.{name}": shape for name, shape in _block_shapes(arch, d, f).items()}
    linear("proj_out", int(arch["out_channels"]) * math.prod(patch), d)  # type: ignore[call-overload]
    shapes["scale_shift_table"] = (1, 2, d)
    return shapes


def _block_shapes(arch: Mapping[str, object], d: int, f: int) -> dict[str, tuple[int, ...]]:
    """One block's weights (diffusers names inside `blocks.N.`) and shapes."""
    shapes: dict[str, tuple[int, ...]] = {"scale_shift_table": (1, 6, d)}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{attn}.{proj}.weight"], shapes[f"{attn}.{proj}.bias"] = (d, d), (d,)
        if arch["qk_norm"]:
            shapes[f"{attn}.norm_q.weight"] = shapes[f"{attn}.norm_k.weight"] = (d,)
    if arch["added_kv_proj_dim"] is not None:
        a = int(arch["added_kv_proj_dim"])  # type: ignore[call-overload]
        for proj in ("add_k_proj", "add_v_proj"):
            shapes[f"attn2.{proj}.weight"], shapes[f"attn2.{proj}.bias"] = (d, a), (d,)
        shapes["attn2.norm_added_k.weight"] = (d,)
    if arch["cross_attn_norm"]:
        shapes["norm2.weight"] = shapes["norm2.bias"] = (d,)
    shapes["ffn.net.0.proj.weight"], shapes["ffn.net.0.proj.bias"] = (f, d), (f,)
    shapes["ffn.net.2.weight"], shapes["ffn.net.2.bias"] = (d, f), (d,)
    return shapes
