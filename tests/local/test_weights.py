"""weights.py: name mapping, both expert layouts, the transform hook, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from local_backend.config import ModelConfig
from local_backend.model import Transformer, load_model
from local_backend.weights import WeightsError, load_weights


@pytest.fixture(scope="module")
def hf_tensors(tiny_hf_model_dir: Path) -> dict[str, torch.Tensor]:
    files = list(tiny_hf_model_dir.glob("*.safetensors"))
    assert len(files) == 1  # the tiny checkpoint is a single model.safetensors
    return load_file(files[0])


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of src's config.json with `tensors` as its single model.safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


def test_every_parameter_comes_from_its_hf_tensor(tiny_model, hf_tensors) -> None:
    model, config = tiny_model
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on meta
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.tok_embeddings.weight, hf_tensors["model.embed_tokens.weight"])
    torch.testing.assert_close(model.output.weight, hf_tensors["lm_head.weight"])
    torch.testing.assert_close(model.norm.weight, hf_tensors["model.norm.weight"])
    for i, layer in enumerate(model.layers):
        hf = f"model.layers.{i}."
        torch.testing.assert_close(
            layer.attention_norm.weight, hf_tensors[hf + "input_layernorm.weight"]
        )
        torch.testing.assert_close(
            layer.ffn_norm.weight, hf_tensors[hf + "post_attention_layernorm.weight"]
        )
        for ours, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            torch.testing.assert_close(
                getattr(layer.attention, ours).weight,
                hf_tensors[f"{hf}self_attn.{theirs}_proj.weight"],
            )
        moe = layer.block_sparse_moe
        torch.testing.assert_close(moe.gate.weight, hf_tensors[hf + "block_sparse_moe.gate.weight"])
        for e in range(config.n_experts):
            for w in ("w1", "w2", "w3"):
                torch.testing.assert_close(
                    getattr(moe, w)[e], hf_tensors[f"{hf}block_sparse_moe.experts.{e}.{w}.weight"]
                )


def test_transposed_fused_layout_loads_the_same(
    tmp_path: Path, tiny_hf_model_dir: Path, hf_tensors, tiny_model
) -> None:
    model, config = tiny_model
    fused = {k: v for k, v in hf_tensors.items() if ".experts." not in k}
    for i in range(config.n_layers):
        per = f"model.layers.{i}.block_sparse_moe.experts."
        w1, w2, w3 = (
            torch.stack([hf_tensors[f"{per}{e}.{w}.weight"] for e in range(8)])
            for w in ("w1", "w2", "w3")
        )
        gate_up = torch.cat([w1, w3], dim=1)  # [E, 2I, D]
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.transpose(1, 2)  # [E, D, 2I]
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w2.transpose(1, 2)  # [E, I, D]
        fused[f"model.layers.{i}.mlp.router.weight"] = fused.pop(
            f"model.layers.{i}.block_sparse_moe.gate.weight"
        )
    folder = write_checkpoint(tiny_hf_model_dir, tmp_path / "fused_t", fused)
    loaded = load_model(folder, dtype=torch.float32, progress=False)
    for (name, ours), (_, ref) in zip(
        loaded.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(ours, ref, msg=name)


def test_transform_hook_sees_full_stacks_and_its_result_is_kept(tiny_hf_model_dir: Path) -> None:
    seen: dict[str, tuple[int, ...]] = {}

    def to_int8(name: str, tensor: torch.Tensor) -> torch.Tensor:
        seen[name] = tuple(tensor.shape)
        if name.endswith(("w1", "w2", "w3")):  # what a quantizer would do to the experts
            return (tensor * 100).round().clamp(-128, 127).to(torch.int8)
        return tensor

    model = load_model(tiny_hf_model_dir, dtype=torch.float32, transform=to_int8, progress=False)
    config = model.config
    assert set(seen) == {name for name, _ in model.named_parameters()}  # once per parameter
    assert seen["layers.1.block_sparse_moe.w2"] == (
        config.n_experts,
        config.dim,
        config.intermediate,
    )
    assert model.get_parameter("layers.1.block_sparse_moe.w2").dtype == torch.int8
    assert model.get_parameter("layers.1.attention.wq.weight").dtype == torch.float32


def test_missing_expert_tensor_is_named(
    tmp_path: Path, tiny_hf_model_dir: Path, hf_tensors
) -> None:
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    folder = write_checkpoint(
        tiny_hf_model_dir, tmp_path / "m", {k: v for k, v in hf_tensors.items() if k != gone}
    )
    with pytest.raises(WeightsError, match=r"lacks 1 tensor\(s\): " + gone.replace(".", r"\.")):
        load_model(folder, dtype=torch.float32, progress=False)


def test_missing_lm_head_is_named(tmp_path: Path, tiny_hf_model_dir: Path, hf_tensors) -> None:
    folder = write_checkpoint(
        tiny_hf_model_dir,
        tmp_path / "m",
        {k: v for k, v in hf_tensors.items() if k != "lm_head.weight"},
    )
    with pytest.raises(WeightsError, match=r"lacks 1 tensor\(s\): lm_head\.weight"):
        load_model(folder, dtype=torch.float32, progress=False)


@pytest.mark.parametrize(
    ("name", "bad_shape", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 32), "[64, 64]"),
        ("model.layers.1.block_sparse_moe.experts.5.w1.weight", (128, 63), "[128, 64]"),
        ("model.embed_tokens.weight", (31999, 64), "[32000, 64]"),
    ],
)
def test_misshapen_tensor_names_tensor_and_shapes(
    tmp_path: Path,
    tiny_hf_model_dir: Path,
    hf_tensors,
    name: str,
    bad_shape: tuple[int, int],
    expected: str,
) -> None:
    tensors = dict(hf_tensors)
    tensors[name] = torch.zeros(bad_shape)
    folder = write_checkpoint(tiny_hf_model_dir, tmp_path / "m", tensors)
    found = str(list(bad_shape))
    with pytest.raises(WeightsError) as info:
        load_model(folder, dtype=torch.float32, progress=False)
    message = str(info.value)
    assert name in message and f"expected shape {expected}" in message
    assert f"found {found}" in message


def test_unexpected_tensor_and_out_of_range_expert(
    tmp_path: Path, tiny_hf_model_dir: Path, hf_tensors
) -> None:
    for extra in (
        "model.layers.0.mlp.shared_expert.weight",
        "model.layers.0.block_sparse_moe.experts.8.w1.weight",
        "model.layers.2.input_layernorm.weight",
    ):
        folder = write_checkpoint(
            tiny_hf_model_dir, tmp_path / extra, {**hf_tensors, extra: torch.zeros(128, 64)}
        )
        with pytest.raises(WeightsError, match="unexpected tensor " + extra.replace(".", r"\.")):
            load_model(folder, dtype=torch.float32, progress=False)


def test_sharded_index_and_its_errors(tmp_path: Path, hf_checkpoint) -> None:
    _, folder = hf_checkpoint("weights_sharded", seed=4, shard="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert load_model(folder, dtype=torch.float32, progress=False).config.n_layers == 2

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / shards[1]).unlink()
    with pytest.raises(WeightsError, match="missing: " + shards[1]):
        load_model(broken, dtype=torch.float32, progress=False)


def test_folder_without_weights(tmp_path: Path, tiny_hf_model_dir: Path) -> None:
    shutil.copy(tiny_hf_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(
        WeightsError, match=r"no model\.safetensors or model\.safetensors\.index\.json"
    ):
        load_model(tmp_path, progress=False)
    model = Transformer.from_config(ModelConfig.from_name("tiny"), device="meta")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "absent", progress=False)


def test_tied_embeddings_share_the_table(
    tmp_path: Path, tiny_hf_model_dir: Path, hf_tensors
) -> None:
    folder = write_checkpoint(
        tiny_hf_model_dir,
        tmp_path / "tied",
        {k: v for k, v in hf_tensors.items() if k != "lm_head.weight"},
    )
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": True}))
    model = load_model(folder, dtype=torch.float32, progress=False)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
