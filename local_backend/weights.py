"""Load Hugging Face Mixtral safetensors into local_backend.model.Transformer.

Public API (model.py builds on this module, never the other way round):

    model.load_model(path, device, dtype, transform=None, progress=True) -> Transformer
        progress: True (a tqdm bar on a terminal, else log lines), False, or a LoadProgress
        config.json -> ModelConfig, the model built on the meta device (no memory), then
        every parameter materialised from the files straight onto `device` in `dtype`
        (also `Transformer.from_model_dir`).
    load_weights(model, path, device, dtype, transform=None, progress=True) -> None
        the same into a model you built (on "meta" or anywhere; every parameter is replaced).
    TensorTransform = Callable[[str, Tensor], Tensor]
    WeightsError     raised for a missing folder/shard, an unknown, missing, duplicated or
                     misshapen tensor; messages name the tensor and the shapes.

Files: `model.safetensors`, or shards listed by `model.safetensors.index.json` (WizardLM-2
8x22B ships 59). Each shard is opened with safetensors' memory-mapped `safe_open` and read one
tensor at a time, so host memory holds one tensor, and the device never holds a parameter
twice (a model built on "meta" owns no storage until its tensor arrives).

Names on disk, both layouts accepted (N = layer, E = expert):

    classic, what Mixtral/WizardLM-2 ship and what transformers 5 `save_pretrained` still
    writes by default (`save_original_format=True`):
        model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight  [I, D] | [D, I] | [I, D]
        model.layers.N.block_sparse_moe.gate.weight                [E, D]
    fused, transformers 5 in memory and `save_pretrained(save_original_format=False)`:
        model.layers.N.mlp.experts.gate_up_proj  [E, 2I, D] = cat(w1, w3) on dim 1
                                                 (or its transpose [E, D, 2I])
        model.layers.N.mlp.experts.down_proj     [E, D, I] (or its transpose [E, I, D])
        model.layers.N.mlp.gate.weight | mlp.router.weight  [E, D]
    and the rest: model.embed_tokens, model.norm, lm_head, model.layers.N.input_layernorm,
    post_attention_layernorm, self_attn.q_proj|k_proj|v_proj|o_proj (`.weight`).

Several ranks (parallel.py): `split_for(name, shape)` names the slice of each tensor this process
holds (a TensorSplit of dimension, start and stop, or None for all of it) and the model's
parameters have those per-rank shapes. Shapes are still checked against the full tensors on
disk, each sharded tensor is read with `get_slice` (only that slice's bytes of the mapped file
are touched), and experts of other ranks are not read at all.

The quantization hook: `transform(name, tensor)` is called once per parameter of ours (e.g.
"layers.3.block_sparse_moe.w1", the full [E, I, D] stack), after the shape check, with the
tensor already on `device` in `dtype`; what it returns becomes the parameter (any dtype or
shape, e.g. packed int4 for the experts; it may also keep scales elsewhere in a closure). Peak
extra device memory is then one stacked parameter in `dtype`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from local_backend.config import ModelConfig
from local_backend.load_progress import LoadProgress
from local_backend.parallel import TensorSplit

TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]
SplitFn = Callable[[str, tuple[int, ...]], TensorSplit | None]  # ParallelContext.tensor_split

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER = r"model\.layers\.(\d+)\."
_DIRECT = {  # HF name (after the layer prefix) -> ours (after "layers.N.")
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "block_sparse_moe.gate.weight": "block_sparse_moe.gate.weight",
    "mlp.gate.weight": "block_sparse_moe.gate.weight",
    "mlp.router.weight": "block_sparse_moe.gate.weight",
}
_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_EXPERT = re.compile(_LAYER + r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
_FUSED = re.compile(_LAYER + r"mlp\.experts\.(gate_up_proj|down_proj)")
_IN_LAYER = re.compile(_LAYER + r"(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older transformers saved


class WeightsError(ValueError):
    """The checkpoint does not match the model: the message names tensors and shapes."""


@dataclass(frozen=True)
class _Piece:
    """Where one tensor on disk goes: the whole of our parameter, or one expert of it."""

    param: str  # our name, e.g. "layers.0.block_sparse_moe.w1"
    expert: int | None = None  # index into the leading [E] dim of a stacked parameter


def _pieces(hf_name: str, config: ModelConfig) -> list[_Piece] | None:
    """Our destination(s) for a tensor name on disk; None when the name is not ours."""
    if hf_name in _TOP:
        return [_Piece(_TOP[hf_name])]
    if m := _PER_EXPERT.fullmatch(hf_name):
        layer, expert, which = m.groups()
        return [_Piece(f"layers.{layer}.block_sparse_moe.{which}", int(expert))]
    if m := _FUSED.fullmatch(hf_name):
        layer, which = m.groups()
        prefix = f"layers.{layer}.block_sparse_moe."
        if which == "gate_up_proj":
            return [_Piece(prefix + "w1"), _Piece(prefix + "w3")]
        return [_Piece(prefix + "w2")]
    if (m := _IN_LAYER.fullmatch(hf_name)) and m.group(2) in _DIRECT:
        return [_Piece(f"layers.{m.group(1)}.{_DIRECT[m.group(2)]}")]
    return None


def _hf_name(param: str, expert: int | None = None) -> str:
    """The classic on-disk name for (one expert of) our parameter, for error messages."""
    for hf, ours in _TOP.items():
        if ours == param:
            return hf
    layer, _, rest = param.removeprefix("layers.").partition(".")
    if rest in ("block_sparse_moe.w1", "block_sparse_moe.w2", "block_sparse_moe.w3"):
        e = "E" if expert is None else str(expert)
        return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{rest[-2:]}.weight"
    direct = next((h for h, o in _DIRECT.items() if o == rest), None)
    # A parameter with no HF counterpart (e.g. one a kernels module added) keeps its own name.
    return f"model.layers.{layer}.{direct}" if direct else param


def _shard_files(model_dir: Path) -> dict[Path, list[str] | None]:
    """Shard file -> the tensor names it should hold (None = every tensor in the file)."""
    if not model_dir.is_dir():
        raise WeightsError(f"model folder {model_dir} does not exist")
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index_path} is not a valid safetensors index: {exc}") from None
        shards: dict[Path, list[str] | None] = {}
        for name, file in sorted(weight_map.items(), key=lambda item: (item[1], item[0])):
            names = shards.setdefault(model_dir / file, [])
            assert names is not None
            names.append(name)
        missing = [path.name for path in shards if not path.is_file()]
        if missing:
            raise WeightsError(
                f"{model_dir}: shard(s) listed in {INDEX_FILE} are missing: "
                + ", ".join(missing[:5])
            )
        return shards
    if (model_dir / SINGLE_FILE).is_file():
        return {model_dir / SINGLE_FILE: None}
    raise WeightsError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir} (only the Hugging Face safetensors "
        "layout is supported)"
    )


def load_weights(
    model: nn.Module,
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transform: TensorTransform | None = None,
    progress: bool | LoadProgress = True,
    split_for: SplitFn | None = None,
) -> None:
    """Materialise every parameter of `model` from the safetensors in `path` (see module doc)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(
            "load_weights needs a model with a ModelConfig `config` (model.Transformer)"
        )
    model_dir = Path(path)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    splits = {n: s for n, shape in expected.items() if split_for and (s := split_for(n, shape))}
    done: set[str] = set()
    partial: dict[str, tuple[torch.Tensor, set[int]]] = {}  # stacked params being filled

    def finish(name: str, tensor: torch.Tensor) -> None:
        if name in done:
            raise WeightsError(f"{_hf_name(name)}: found twice in {model_dir}")
        if transform is not None:
            tensor = transform(name, tensor)
        _set_parameter(model, name, tensor)
        done.add(name)

    shards = _shard_files(model_dir)
    reporter = progress if isinstance(progress, LoadProgress) else LoadProgress(enabled=progress)
    reporter.begin(sum(shard.stat().st_size for shard in shards), len(shards))
    try:
        for shard, listed in shards.items():
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for hf_name in listed if listed is not None else sorted(f.keys()):
                    _load_one(
                        f, hf_name, shard, config, expected, splits, partial, finish, device, dtype
                    )
                    reporter.advance(_stored_bytes(f, hf_name))
            reporter.shard_done(shard.stat().st_size)
    finally:
        reporter.close()

    if "output.weight" not in done and config.tie_embeddings and "tok_embeddings.weight" in done:
        _set_parameter(model, "output.weight", model.get_parameter("tok_embeddings.weight"))
        done.add("output.weight")
    missing = []
    for name in expected:
        if name in partial:
            buffer, filled = partial[name]
            absent = sorted(set(range(buffer.shape[0])) - filled)
            first = splits[name].start if name in splits else 0
            missing += [_hf_name(name, first + e) for e in absent]
        elif name not in done:
            missing.append(_hf_name(name))
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise WeightsError(
            f"{model_dir} lacks {len(missing)} tensor(s): {', '.join(missing[:10])}{more}"
        )


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def _stored_bytes(f, hf_name: str) -> int:  # type: ignore[no-untyped-def]
    """Bytes of one tensor in its file (from the header: nothing more is read)."""
    piece = f.get_slice(hf_name)
    count = 1
    for size in piece.get_shape():
        count *= size
    return count * _DTYPE_BYTES.get(piece.get_dtype(), 1)


def _load_one(
    f,  # a safetensors safe_open handle
    hf_name: str,
    shard: Path,
    config: ModelConfig,
    expected: dict[str, tuple[int, ...]],
    splits: dict[str, TensorSplit],
    partial: dict[str, tuple[torch.Tensor, set[int]]],
    finish: Callable[[str, torch.Tensor], None],
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """Check one tensor's shape against its destination(s), read it and place it."""
    if _IGNORED.fullmatch(hf_name):
        return
    pieces = _pieces(hf_name, config)
    known = pieces is not None and all(
        p.param in expected and (p.expert is None or p.expert < config.n_experts) for p in pieces
    )
    if pieces is None or not known:
        raise WeightsError(
            f"{shard.name}: unexpected tensor {hf_name} (not a Mixtral weight, "
            f"or a layer/expert beyond the config's {config.n_layers} layers, "
            f"{config.n_experts} experts)"
        )
    try:
        found = tuple(f.get_slice(hf_name).get_shape())
    except Exception as exc:  # a name the index lists but the shard lacks
        raise WeightsError(f"{shard.name}: cannot read {hf_name}: {exc}") from None

    def mismatch(want: tuple[int, ...]) -> WeightsError:
        return WeightsError(
            f"{hf_name} in {shard.name}: expected shape {list(want)}, found {list(found)}"
        )

    first = pieces[0]
    ours = expected[first.param]  # this process's shape (a rank's share, or the whole)
    split = splits.get(first.param)
    full = ours if split is None else (*ours[: split.dim], split.size, *ours[split.dim + 1 :])
    if first.expert is not None:  # one expert of a stacked [E, ...] parameter
        if found != full[1:]:
            raise mismatch(full[1:])
        expert = first.expert - (split.start if split else 0)  # index in our stack
        if not 0 <= expert < ours[0]:
            return  # another rank's expert: not read
        buffer, filled = partial.get(first.param) or (
            torch.empty(ours, device=device, dtype=dtype),
            set(),
        )
        partial[first.param] = (buffer, filled)
        if expert in filled:
            raise WeightsError(f"{hf_name}: found twice")
        buffer[expert].copy_(f.get_tensor(hf_name))
        filled.add(expert)
        if len(filled) == ours[0]:
            del partial[first.param]
            finish(first.param, buffer)
        return

    experts = slice(split.start, split.stop) if split else slice(None)  # dim 0 when split
    if len(pieces) == 2:  # fused gate_up_proj: [E, 2I, D] = cat(w1, w3) along dim 1
        E, I, D = full
        if found not in ((E, 2 * I, D), (E, D, 2 * I)):
            raise mismatch((E, 2 * I, D))
        if found == (E, 2 * I, D):  # read each half straight from the file
            halves = f.get_slice(hf_name)
            w1, w3 = halves[experts, :I], halves[experts, I:]  # [E, I, D] each
        else:
            gate_up = _read(f, hf_name, split, False).transpose(1, 2)  # [E, D, 2I] -> [E, 2I, D]
            w1, w3 = gate_up[:, :I], gate_up[:, I:]  # [E, I, D] each
        finish(pieces[0].param, w1.to(device=device, dtype=dtype).contiguous())
        finish(pieces[1].param, w3.to(device=device, dtype=dtype).contiguous())
        return

    transposed = len(full) == 3 and found == (full[0], full[2], full[1])  # fused down_proj
    if found != full and not transposed:
        raise mismatch(full)
    tensor = _read(f, hf_name, split, transposed).to(device=device, dtype=dtype)
    if found != full:
        tensor = tensor.transpose(1, 2).contiguous()  # [E, I, D] -> [E, D, I]
    finish(first.param, tensor)


def _read(
    f,  # a safetensors safe_open handle
    hf_name: str,
    split: TensorSplit | None,
    transposed: bool,
) -> torch.Tensor:
    """The tensor, or only this rank's slice of it (a transposed 3-D tensor swaps dims 1, 2)."""
    if split is None:
        return f.get_tensor(hf_name)
    dim = {1: 2, 2: 1}.get(split.dim, split.dim) if transposed else split.dim
    index = [slice(None)] * (dim + 1)
    index[dim] = slice(split.start, split.stop)
    return f.get_slice(hf_name)[tuple(index)]


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter `name` (possibly on meta) by `tensor`, frozen for inference."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
