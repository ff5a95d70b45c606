"""Wan transformer weights in and out: diffusers' layout and the original release's, against diffusers
itself (its own converter of the original layout, its from_pretrained), with tiny random models."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from sora_train.config import ConfigError, ModelConfig
from sora_train.models.denoiser import build_denoiser
from sora_train.pretrained import (
    ArchitectureMismatch,
    DiffusersTooOld,
    PretrainedFormatError,
    WeightsDoNotFit,
    architecture,
    check_architecture,
    load_pretrained,
    open_folder,
    reading,
    write_diffusers,
    write_wan,
)
from sora_train.pretrained.wan_layout import (
    diffusers_architecture,
    diffusers_to_original,
    expected_shapes,
    model_architecture,
    original_architecture,
    original_to_diffusers,
)

from .conftest import REPO, assert_ok, run_torchrun

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

# Tiny Wan transformers; the pixel latent space has 3 channels, so in/out are 3 (image-to-video: 7).
BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2)  # fmt: skip
KINDS = {
    "t2v": {},
    "i2v": {"in_channels": 7, "image_dim": 12, "added_kv_proj_dim": 16},
    "flf2v": {"in_channels": 7, "image_dim": 12, "added_kv_proj_dim": 16, "pos_embed_seq_len": 6},
}


def reference(kind: str = "t2v", seed: int = 0, **changes) -> nn.Module:
    """A random diffusers WanTransformer3DModel, every parameter moved off its initial value."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**{**BASE, **KINDS[kind], **changes})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


def model_config(kind: str = "t2v", **changes) -> ModelConfig:
    """The ModelConfig of `reference(kind)` (pixel latent space, learned text encoder)."""
    extra = {key: value for key, value in KINDS[kind].items()}
    values = dict(preset="test", variant="wan", hidden_size=16, depth=2, num_heads=2, patch_size=[1, 2, 2],
                  text_dim=16, freq_dim=16, ffn_dim=32, **extra)  # fmt: skip
    return ModelConfig(**{**values, **changes})


class Holder(nn.Module):
    """A module keeping a Wan transformer as `.dit` (keys `dit.<diffusers name>`) beside other weights."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.text_encoder = nn.Linear(2, 2)


def fresh(kind: str = "t2v", **changes) -> Holder:
    return Holder(reference(kind, seed=99, **changes))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def prefixed(state: dict[str, torch.Tensor], prefix: str = "dit.") -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def save_original(
    state: dict[str, torch.Tensor], config: dict, directory: Path, suffix: str = ".safetensors"
):
    """An original-Wan folder: config.json + the weights under their original names."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    original = {name: tensor.contiguous() for name, tensor in diffusers_to_original(state).items()}
    if suffix == ".safetensors":
        save_file(original, str(directory / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(original, directory / f"diffusion_pytorch_model{suffix}")
    return directory


def original_config_of(kind: str = "t2v") -> dict:
    """What the original release's config.json says about `reference(kind)`."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v" if kind == "t2v" else kind,
            "patch_size": [1, 2, 2], "dim": 16, "ffn_dim": 32, "freq_dim": 16, "in_dim": BASE["in_channels"]
            + (4 if kind != "t2v" else 0), "out_dim": 3, "num_heads": 2, "num_layers": 2, "text_dim": 16,
            "text_len": 512, "eps": 1e-6}  # fmt: skip


# --- the key mapping, against diffusers' own converter of the original layout ---------------------


def test_original_names_are_the_releases():
    """One I2V block in the original release's names (Wan2.1 wan/modules/model.py), written out."""
    state = reference("i2v", num_layers=1).state_dict()
    linear = lambda name: {f"{name}.weight", f"{name}.bias"}  # noqa: E731
    attention = set().union(*(linear(f"blocks.0.self_attn.{p}") for p in "qkvo")) | {
        "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight",
    } | set().union(*(linear(f"blocks.0.cross_attn.{p}") for p in ("q", "k", "v", "o", "k_img", "v_img"))) | {
        "blocks.0.cross_attn.norm_q.weight", "blocks.0.cross_attn.norm_k.weight",
        "blocks.0.cross_attn.norm_k_img.weight",
    }  # fmt: skip
    expected = (
        linear("patch_embedding") | linear("time_embedding.0") | linear("time_embedding.2")
        | linear("time_projection.1") | linear("text_embedding.0") | linear("text_embedding.2")
        | linear("img_emb.proj.0") | linear("img_emb.proj.1") | linear("img_emb.proj.3") | linear("img_emb.proj.4")
        | {"blocks.0.modulation"} | attention | linear("blocks.0.norm3") | linear("blocks.0.ffn.0")
        | linear("blocks.0.ffn.2") | linear("head.head") | {"head.modulation"}
    )  # fmt: skip
    assert set(diffusers_to_original(state)) == expected


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_our_mapping_is_diffusers_converter_and_inverts_exactly(kind):
    state = reference(kind).state_dict()
    original = diffusers_to_original(state)
    theirs = convert_wan_transformer_to_diffusers(dict(original))  # it pops from what it is given
    ours = original_to_diffusers(original)
    assert list(theirs) == list(ours)  # key for key, in order
    assert_same(ours, theirs)
    assert_same(ours, state)
    assert_same(diffusers_to_original(ours), original)
    # the cross-attention norm is the original's norm3 and diffusers' norm2 (DESIGN.md's trap)
    assert torch.equal(original["blocks.1.norm3.weight"], state["blocks.1.norm2.weight"])


def test_flf2v_position_embedding_maps_as_diffusers_conversion_script():
    """scripts/convert_wan_to_diffusers.py maps img_emb.emb_pos -> ...image_embedder.pos_embed; the
    single-file converter has no entry for it and leaves it under its original name."""
    state = reference("flf2v").state_dict()
    original = diffusers_to_original(state)
    assert original["img_emb.emb_pos"] is state["condition_embedder.image_embedder.pos_embed"]
    theirs = convert_wan_transformer_to_diffusers(dict(original))
    assert set(theirs) ^ set(state) == {"img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"}
    assert_same(original_to_diffusers(original), state)


@pytest.mark.parametrize("changes", [{}, {"cross_attn_norm": False}, {"patch_size": (2, 2, 2)}])
@pytest.mark.parametrize("kind", list(KINDS))
def test_expected_shapes_are_diffusers(kind, changes):
    model = reference(kind, **changes)
    arch = diffusers_architecture(dict(model.config))
    assert expected_shapes(arch) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


# --- config.json <-> ModelConfig --------------------------------------------------------------------


def test_released_configs_read_as_model_config_fields():
    """Wan2.1-T2V-1.3B's and -I2V-14B's config.json as released (the image branch from the shapes)."""
    t2v = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
           "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
           "text_len": 512}  # fmt: skip
    arch = original_architecture(t2v, {})
    assert {k: arch[k] for k in ("hidden_size", "num_heads", "depth", "ffn_dim", "in_channels", "text_dim")} == {
        "hidden_size": 1536, "num_heads": 12, "depth": 30, "ffn_dim": 8960, "in_channels": 16, "text_dim": 4096,
    }  # fmt: skip
    assert (arch["image_dim"], arch["patch_size"], arch["cross_attn_norm"], arch["norm_eps"]) == (
        None,
        [1, 2, 2],
        True,
        1e-6,
    )
    i2v = {
        **t2v,
        "dim": 5120,
        "ffn_dim": 13824,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": 40,
        "num_layers": 40,
    }
    arch = original_architecture(i2v, {"img_emb.proj.0.weight": (1280,)})
    assert (arch["image_dim"], arch["added_kv_proj_dim"], arch["in_channels"], arch["out_channels"]) == (
        1280,
        5120,
        36,
        16,
    )
    diffusers_i2v = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": 5120, "attention_head_dim": 128,
                     "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280,
                     "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
                     "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096}  # fmt: skip
    assert diffusers_architecture(diffusers_i2v) == arch  # both layouts describe the same model
    with pytest.raises(PretrainedFormatError, match="model_type 'vace' is not supported"):
        original_architecture({**t2v, "model_type": "vace"}, {})


@pytest.mark.parametrize("kind", list(KINDS))
def test_model_config_and_folder_architecture_agree(kind, tmp_path):
    reference(kind).save_pretrained(tmp_path / "d")
    cfg = model_config(kind)
    assert model_architecture(cfg) == diffusers_architecture(
        json.loads((tmp_path / "d/config.json").read_text())
    )
    check_architecture(cfg, tmp_path / "d")
    assert architecture(tmp_path / "d")["ffn_dim"] == 32
    # ffn_dim unset resolves as the model builds it: hidden_size × mlp_ratio = 32
    check_architecture(model_config(kind, ffn_dim=None, mlp_ratio=2.0), tmp_path / "d")


def test_a_differing_field_is_named_with_both_values(tmp_path):
    reference().save_pretrained(tmp_path / "d")
    with pytest.raises(ArchitectureMismatch) as caught:
        check_architecture(model_config(ffn_dim=64), tmp_path / "d")
    assert str(caught.value) == f"model.ffn_dim=64 but {tmp_path / 'd' / 'config.json'} says 32"
    with pytest.raises(ArchitectureMismatch, match=r"model.in_channels=None \(so 3\) but .* says 7"):
        check_architecture(model_config("t2v"), _saved(reference("i2v"), tmp_path / "i2v"))
    with pytest.raises(
        ArchitectureMismatch, match=r"model.latent_space=pixel has 3 channels but .* predicts 4"
    ):
        check_architecture(
            model_config(in_channels=4), _saved(reference(in_channels=4, out_channels=4), tmp_path / "c4")
        )


def _saved(model: nn.Module, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def test_init_from_is_checked_with_the_model_config(tmp_path):
    folder = _saved(reference(), tmp_path / "d")
    model_config(init_from=str(folder)).check()
    for cfg, message in [
        (model_config(init_from=str(tmp_path / "nope")), f"{tmp_path}/nope: no such directory"),
        (model_config(init_from=str(tmp_path)), f"{tmp_path} is not a Wan transformer: no config.json"),
        (model_config(depth=3, init_from=str(folder)), "model.depth=3 but .*config.json says 2"),
    ]:
        with pytest.raises(ConfigError, match=f"^model.init_from: {message}"):
            cfg.check()
    dit = ModelConfig(preset="t", hidden_size=16, depth=2, num_heads=2, text_dim=16, init_from=str(folder))
    with pytest.raises(
        ConfigError, match=r"model.init_from needs model.variant=wan, got model.variant=cross_attention"
    ):
        dit.check()


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_a_diffusers_folder_single_and_sharded(kind, tmp_path):
    source = reference(kind)
    for name, kwargs in [("single", {}), ("sharded", {"max_shard_size": "4KB"})]:
        folder = _saved(source, tmp_path / name, **kwargs)
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file() == (name == "sharded")
        model = fresh(kind)
        text_encoder = snapshot(model.text_encoder)
        loaded = load_pretrained(model, folder)
        assert (loaded.layout, loaded.tensors) == ("diffusers", len(source.state_dict()))
        assert_same(snapshot(model.dit), source.state_dict())
        assert_same(snapshot(model.text_encoder), text_encoder)  # outside the prefix: untouched


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_load_an_original_folder(kind, suffix, tmp_path):
    source = reference(kind).state_dict()
    folder = save_original(source, original_config_of(kind), tmp_path / "wan", suffix)
    (folder / "Wan2.1_VAE.pth").write_bytes(b"other weights beside, as in the release")
    assert open_folder(folder).layout == "wan"
    model = fresh(kind)
    load_pretrained(model, folder)
    assert_same(snapshot(model.dit), source)
    check_architecture(model_config(kind), folder)


def test_load_casts_to_the_parameters_dtype_and_feeds_the_copy_hook(tmp_path):
    source = reference()
    folder = _saved(source, tmp_path / "d")
    model = fresh().to(torch.bfloat16)
    calls = []

    def copy(target: torch.Tensor, tensor: torch.Tensor) -> None:  # e.g. a ZeRO-3 gather-copy-release
        calls.append(tensor.dtype)
        target.data.copy_(tensor)

    load_pretrained(model, folder, copy=copy)
    assert calls == [torch.bfloat16] * len(source.state_dict())
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in source.state_dict().items()}
    assert_same(snapshot(model.dit), expected)


def test_a_partitioned_parameter_is_checked_by_its_full_shape(tmp_path):
    """Under ZeRO-3 a parameter holds a flat partition; DeepSpeed records the full shape as ds_shape."""
    folder = _saved(reference(), tmp_path / "d")
    model = fresh()
    model.dit.proj_out.bias.ds_shape = torch.Size([5])
    with pytest.raises(
        PretrainedFormatError, match=r"dit.proj_out.bias: \[12\] in the folder, \[5\] in the model"
    ):
        load_pretrained(model, folder)


# Run under torchrun: the model is built partitioned (deepspeed.zero.Init), then fed one tensor at a time.
ZERO3_SCRIPT = """
import gc
import sys
from pathlib import Path

import deepspeed
import diffusers
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from sora_train.parallel.zero import copy_from_rank0
from sora_train.pretrained import load_pretrained

folder = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dit = diffusers.WanTransformer3DModel.from_config(diffusers.WanTransformer3DModel.load_config(folder))


with deepspeed.zero.Init(config_dict_or_path=config):
    model = Holder()
full = load_file(folder / "diffusion_pytorch_model.safetensors")
sizes = {name: p.numel() for name, p in model.dit.named_parameters()}
assert all(sizes[n] < full[n].numel() for n in sizes if full[n].numel() > 1), "not partitioned"


loaded = load_pretrained(model, folder, copy=copy_from_rank0)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    state = {name.removeprefix("dit."): p.detach().clone() for name, p in engine.module.named_parameters()}
assert state.keys() == full.keys()
bad = [name for name in full if not torch.equal(state[name], full[name])]
assert not bad, bad
print(f"rank {dist.get_rank()}: {loaded.tensors} tensors loaded partitioned")
# leave the process group while the interpreter is whole (a gloo group freed at exit can abort)
engine.destroy()
del engine, model
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_zero3_partitions_are_fed_one_tensor_at_a_time(tmp_path):
    """Two ranks build the model partitioned (deepspeed.zero.Init); the copy hook gathers one parameter,
    copies on rank 0 and re-partitions; the engine then holds exactly the folder's weights."""
    folder = _saved(reference("i2v"), tmp_path / "d")
    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_SCRIPT)
    result = run_torchrun(2, script, str(folder), timeout=300)
    assert_ok(result)
    assert "rank 0: 87 tensors loaded partitioned" in result.stdout


# --- bad folders: one clear error, nothing changed -------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(folder: Path, change) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, str(path))


def _corrupt(case: str, folder: Path, tmp_path: Path) -> None:
    weights, config = folder / "diffusion_pytorch_model.safetensors", folder / "config.json"
    if case == "no config":
        config.unlink()
    elif case == "config not json":
        config.write_text("{not json")
    elif case == "wrong _class_name":
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "_class_name": "WanVACETransformer3DModel"})
        )
    elif case == "neither layout":
        config.write_text(json.dumps({"d_model": 32}))
    elif case == "no weights":
        weights.unlink()
    elif case == "one tensor missing":
        _rewrite(folder, lambda state: state.pop("blocks.1.ffn.net.2.bias"))
    elif case == "one tensor extra":
        _rewrite(folder, lambda state: state.update({"blocks.0.attn1.to_qkv.weight": torch.zeros(48, 16)}))
    elif case == "one tensor mis-shaped":
        _rewrite(folder, lambda state: state.update({"proj_out.bias": torch.zeros(13)}))
    elif case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "a .pth holding a pickled object":
        weights.unlink()
        config.write_text(json.dumps(original_config_of()))
        torch.save({"head.modulation": _Exploit(tmp_path / "pwned")}, folder / "diffusion_pytorch_model.pth")
    elif case == "a .pth of the old format":
        weights.unlink()
        config.write_text(json.dumps(original_config_of()))
        torch.save(
            {"head.modulation": torch.zeros(1)}, folder / "w.pth", _use_new_zipfile_serialization=False
        )


def _corrupt_sharded(case: str, folder: Path) -> None:
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if case == "a shard missing":
        (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()
    else:  # the index names a tensor no shard holds
        index["weight_map"]["blocks.9.norm2.weight"] = next(iter(index["weight_map"].values()))
        index_path.write_text(json.dumps(index))


CORRUPTIONS = {
    "no config": "is not a Wan transformer: no config.json",
    "config not json": "config.json: unreadable JSON",
    "wrong _class_name": "has _class_name 'WanVACETransformer3DModel', expected WanTransformer3DModel",
    "neither layout": "has neither _class_name WanTransformer3DModel nor the original Wan keys",
    "no weights": "has no diffusion_pytorch_model.safetensors",
    "one tensor missing": r"does not fit the model: 1 missing \(dit.blocks.1.ffn.net.2.bias\)$",
    "one tensor extra": r"does not fit the model: 1 unexpected \(blocks.0.attn1.to_qkv.weight\)$",
    "one tensor mis-shaped": r"does not fit the model: 1 mis-shaped \(dit.proj_out.bias: \[13\] in the folder, \[12\] in the model\)$",
    "truncated safetensors": "not a readable safetensors file",
    "a .pth holding a pickled object": "not a weights-only torch file of tensors",
    "a .pth of the old format": "not a weights-only torch file of tensors",
}


@pytest.mark.parametrize("case", [*CORRUPTIONS, "a shard missing", "index and shards disagree"])
def test_a_bad_folder_is_one_clear_error_and_changes_nothing(case, tmp_path):
    sharded = case in ("a shard missing", "index and shards disagree")
    folder = _saved(reference(), tmp_path / "d", **({"max_shard_size": "4KB"} if sharded else {}))
    if sharded:
        _corrupt_sharded(case, folder)
    else:
        _corrupt(case, folder, tmp_path)
    message = CORRUPTIONS.get(case) or (
        "lists shards that are missing" if case == "a shard missing" else "disagree"
    )
    model = fresh()
    before = snapshot(model)
    with pytest.raises(PretrainedFormatError, match=message) as caught:
        load_pretrained(model, folder)
    assert "\n" not in str(caught.value)
    assert_same(snapshot(model), before)
    assert not (tmp_path / "pwned").exists()


# --- writing -------------------------------------------------------------------------------------


def quietly(load):
    """`load()`, failing on any warning diffusers, transformers or accelerate logs, or Python raises."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "accelerate")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not records, [record.getMessage() for record in records]
    assert not caught, [str(warning.message) for warning in caught]
    return loaded


def from_pretrained_quietly(directory: Path) -> nn.Module:
    """diffusers' WanTransformer3DModel.from_pretrained, failing on any warning."""
    return quietly(lambda: diffusers.WanTransformer3DModel.from_pretrained(directory))


def test_the_warning_capture_sees_diffusers_warnings(tmp_path):
    folder = _saved(reference(), tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "no_such_argument": 1}))
    with pytest.raises(AssertionError, match="no_such_argument"):
        from_pretrained_quietly(folder)


@pytest.mark.parametrize("shard", [None, 4096])
@pytest.mark.parametrize("kind", list(KINDS))
def test_write_diffusers_loads_in_diffusers_without_warnings_and_round_trips(kind, shard, tmp_path):
    source = reference(kind)
    model = fresh(kind)
    load_pretrained(model, _saved(source, tmp_path / "in"))
    kwargs = {"max_shard_bytes": shard} if shard else {}
    out = write_diffusers(prefixed(model.dit.state_dict()), model_config(kind), tmp_path / "out", **kwargs)
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == bool(shard)
    if shard:
        assert len(json.loads(index.read_text())["weight_map"]) == len(source.state_dict())
    assert_same(from_pretrained_quietly(out).state_dict(), source.state_dict())
    again = fresh(kind)
    load_pretrained(again, out)
    assert_same(snapshot(again.dit), source.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging left behind


@pytest.mark.parametrize("kind", list(KINDS))
def test_write_wan_is_the_original_layout_and_round_trips(kind, tmp_path):
    source = reference(kind, in_channels=7) if kind == "t2v" else reference(kind)
    cfg = model_config(kind, in_channels=7) if kind == "t2v" else model_config(kind)
    if kind != "t2v":  # the original fixes the CLIP width (1280) and the FLF2V positions (514)
        with pytest.raises(PretrainedFormatError, match="the original Wan layout fixes image_dim=1280"):
            write_wan(prefixed(source.state_dict()), cfg, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
        changes = {"image_dim": 1280} | ({"pos_embed_seq_len": 514} if kind == "flf2v" else {})
        source, cfg = reference(kind, **changes), model_config(kind, **changes)
    out = write_wan(prefixed(source.state_dict()), cfg, tmp_path / "wan")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "WanModel"
    assert config["model_type"] == {"t2v": "i2v", "i2v": "i2v", "flf2v": "flf2v"}[kind]  # t2v: 7 in, 3 out
    stored = load_file(out / "diffusion_pytorch_model.safetensors")
    assert_same(stored, diffusers_to_original(source.state_dict()))
    again = fresh(kind, **({"in_channels": 7} if kind == "t2v" else changes))
    load_pretrained(again, out)
    assert_same(snapshot(again.dit), source.state_dict())
    check_architecture(cfg, out)


def test_writers_refuse_what_does_not_fit_and_write_nothing(tmp_path):
    weights = prefixed(reference().state_dict())
    cases = [
        (dict(weights) | {"text_encoder.embed.weight": torch.zeros(2)}, model_config(), "learned text encoder"),
        ({k: v for k, v in weights.items() if "proj_out.bias" not in k}, model_config(), r"1 missing \(proj_out.bias\)"),
        (weights, model_config(ffn_dim=64), r"mis-shaped \(dit.blocks.0.ffn.net.0.proj.bias: \[32\], the config gives \[64\]"),
        (weights, model_config(rope_theta=500.0), "fixes rope_theta=10000"),
    ]  # fmt: skip
    for state, cfg, message in cases:
        for writer in (write_diffusers, write_wan):
            with pytest.raises(
                WeightsDoNotFit if "rope" not in message else PretrainedFormatError, match=message
            ):
                writer(state, cfg, tmp_path / "out")
            assert not list(tmp_path.iterdir())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        write_diffusers(weights, model_config(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "out" / "keep.txt").unlink()
    write_diffusers(weights, model_config(), tmp_path / "out")  # an empty directory is fine
    assert (tmp_path / "out" / "config.json").is_file()


def test_too_old_a_diffusers_is_one_clear_error(tmp_path, monkeypatch):
    folder = _saved(reference(), tmp_path / "d")
    original = save_original(reference().state_dict(), original_config_of(), tmp_path / "wan")
    monkeypatch.setattr(reading, "installed_diffusers_version", lambda: "0.32.2")
    message = r"diffusers 0.32.2 is installed; the Wan transformer layout needs diffusers>=0.33.0"
    with pytest.raises(DiffusersTooOld, match=message):
        load_pretrained(fresh(), folder)
    with pytest.raises(DiffusersTooOld, match=message):
        write_diffusers(prefixed(reference().state_dict()), model_config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    load_pretrained(fresh(), original)  # the original layout does not depend on diffusers
    monkeypatch.setattr(reading, "installed_diffusers_version", lambda: "0.33.1")
    flf = _saved(reference("flf2v"), tmp_path / "flf")
    with pytest.raises(DiffusersTooOld, match=r"needs diffusers>=0.34.0"):
        open_folder(flf)


# --- with the project's own Wan transformer --------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_wan_denoiser_loads_and_writes_both_layouts(kind, tmp_path):
    """The project's WanTransformer (models/wan.py) as `VideoDenoiser.dit`, with a frozen encoder (no
    `text_encoder.*` weights): from init_from, out to diffusers (and, text-to-video, the original)."""
    source = reference(kind)
    cfg = model_config(kind, init_from=str(_saved(source, tmp_path / "d")), text_encoder="umt5")
    denoiser = build_denoiser(cfg)
    assert denoiser.state_dict().keys() == prefixed(source.state_dict()).keys()
    load_pretrained(denoiser, cfg.init_from)
    assert_same(snapshot(denoiser), prefixed(source.state_dict()))
    out = write_diffusers(denoiser.state_dict(), cfg, tmp_path / "o")
    assert_same(from_pretrained_quietly(out).state_dict(), source.state_dict())
    if kind == "t2v":
        again = build_denoiser(cfg)
        load_pretrained(again, write_wan(denoiser.state_dict(), cfg, tmp_path / "wan"))
        assert_same(snapshot(again), prefixed(source.state_dict()))


def test_init_from_checks_with_the_wan_denoiser_config(tmp_path):
    """model.init_from validates as part of ModelConfig.check (here with the learned encoder)."""
    cfg = model_config("i2v", init_from=str(_saved(reference("i2v"), tmp_path / "d")))
    cfg.check()
    denoiser = build_denoiser(cfg)
    load_pretrained(denoiser, cfg.init_from)  # the learned encoder's text_encoder.* are left as built


def test_an_original_single_file_export_with_the_model_prefix_loads(tmp_path):
    """Single-file exports of the original weights name them model.diffusion_model.<original name>."""
    source = reference().state_dict()
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(original_config_of()))
    weights = {f"model.diffusion_model.{k}": v.contiguous() for k, v in diffusers_to_original(source).items()}
    save_file(weights, str(folder / "wan2.1_t2v_1.3B_bf16.safetensors"))
    model = fresh()
    load_pretrained(model, folder)
    assert_same(snapshot(model.dit), source)


def test_init_from_under_too_old_a_diffusers_is_a_config_error(tmp_path, monkeypatch):
    cfg = model_config(init_from=str(_saved(reference(), tmp_path / "d")))
    monkeypatch.setattr(reading, "installed_diffusers_version", lambda: "0.31.0")
    with pytest.raises(
        ConfigError, match=r"^model.init_from: diffusers 0.31.0 is installed; .* needs diffusers>=0.33.0"
    ):
        cfg.check()


RELEASED = {  # the original release's config.json of each preset's model (and its VAE's latent channels)
    "wan21_t2v_1.3B": ({"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16}, 16),
    "wan21_t2v_14B": ({"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16}, 16),
    "wan22_ti2v_5B": ({"dim": 3072, "ffn_dim": 14336, "num_heads": 24, "num_layers": 30, "in_dim": 48, "out_dim": 48,
                       "model_type": "ti2v"}, 48),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(RELEASED))
def test_the_wan_presets_are_the_released_architectures(preset, tmp_path):
    released, latent_channels = RELEASED[preset]
    (tmp_path / "config.json").write_text(json.dumps({"z_dim": latent_channels}))
    values = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
    cfg = ModelConfig(**{**values, "vae_path": str(tmp_path)})
    ours = model_architecture(cfg)
    theirs = original_architecture({"eps": 1e-6, "freq_dim": 256, "model_type": "t2v", **released}, {})
    assert ours == theirs
