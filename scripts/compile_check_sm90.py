"""Compile issue 11's Triton kernels for an H100 / H200 (sm_90) without a GPU.

The CPU interpreter runs a kernel's logic but not the compiler: a type the NVIDIA backend
rejects, a layout it cannot build, or shared memory past the limit only shows at the first
launch on the GPU. triton ships ptxas, so each kernel is compiled to a cubin here, at the
launch configs the heuristics and the tuner use, and its shared memory is printed.

    python scripts/compile_check_sm90.py        # exit status: the number of failures

triton is imported before local_backend so the kernels are compiled JIT functions (the
package switches the interpreter on only when it is imported first): run it in its own
process, without TRITON_INTERPRET.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import triton  # must precede local_backend (see above)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from local_backend.kernels import decode_attention, dense_quant, rotary

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and spill bytes (STACK) of a cubin, read by the cuobjdump triton ships."""
    if not CUOBJDUMP.exists() and not shutil.which("cuobjdump"):
        return {}
    tool = str(CUOBJDUMP) if CUOBJDUMP.exists() else "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {"regs": int(fields.get("REG", 0)), "spill": int(fields.get("STACK", 0))}
    return {}


def ints(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def compile_one(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    label: str,
    warps: int = 4,
    stages: int = 3,
    spills_fail: bool = True,
) -> bool:
    """Compile for sm_90; False on an error, or on spilled registers where `spills_fail`."""
    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    try:
        source = ASTSource(fn=fn, signature=full, constexprs=constexprs)
        kernel = triton.compile(
            source, target=TARGET, options={"num_warps": warps, "num_stages": stages}
        )
    except Exception as exc:
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
        return False
    usage = resource_usage(kernel.asm["cubin"])
    spilled = usage.get("spill", 0) > 0
    verdict = "FAIL" if spilled and spills_fail else "ok  "
    print(f"{verdict} {label}: shared memory {kernel.metadata.shared} B, {usage}")
    return not (spilled and spills_fail)


def main() -> int:
    if type(dense_quant._dense_quant_kernel).__name__ != "JITFunction":
        print("the kernels are interpreted functions: run without TRITON_INTERPRET")
        return 1
    results = []
    dense = {
        "x_ptr": "*bf16",
        "w_ptr": "*u8",
        "s_ptr": "*fp16",
        "y_ptr": "*bf16",
        "part_ptr": "*fp32",
        "count_ptr": "*i32",
        **ints(
            "M",
            "N",
            "K",
            "k_per_split",
            "split_k",
            "stride_xm",
            "stride_wn",
            "stride_sg",
            "stride_ym",
            "stride_ps",
        ),
    }
    # exactly what the heuristic launches at 8x22B shapes (132 SMs): must not spill
    dense_quant.sm_count = lambda device: 132  # type: ignore[assignment]
    picked: dict[tuple[Any, ...], str] = {}
    for fmt, group in (("int4", 128), ("int8", 6144)):
        for n in (8192, 1024, 32000):
            for m in (1, 2, 4, 8, 16, 32, 64, 512):
                weight = SimpleNamespace(format=fmt, group_size=group, out_features=n,
                                         in_features=6144)  # fmt: skip
                config = dense_quant.heuristic(weight, m, torch.device("cuda"))  # type: ignore[arg-type]
                key = (fmt, config.block_m, config.block_n, config.block_k,
                       config.split_k > 1, config.num_warps, config.num_stages)  # fmt: skip
                picked.setdefault(key, f"heuristic M={m}")
    # and the tuner's GEMM tiles (reported, a spill there only makes a slower candidate)
    for fmt in ("int4", "int8"):
        for bm, bn in ((64, 128), (128, 64)):
            key = (fmt, bm, bn, 128 if fmt == "int4" else 64, False, 8, 3)
            picked.setdefault(key, "tuner candidate")
    for (fmt, bm, bn, bk, split, warps, stages), why in picked.items():
        consts = {"WEIGHT_FORMAT": 2 if fmt == "int4" else 1, "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_K": bk, "SPLIT": split, "DOT_FP32": False}  # fmt: skip
        codes = "*u8" if fmt == "int4" else "*i8"
        label = f"dense {fmt} {bm}x{bn}x{bk} split {split} warps {warps} ({why})"
        results.append(compile_one(dense_quant._dense_quant_kernel, {**dense, "w_ptr": codes},
                                   consts, label, warps, stages,
                                   spills_fail=why != "tuner candidate"))  # fmt: skip
    results.append(
        compile_one(
            dense_quant._dequant_int4_kernel,
            {
                "w_ptr": "*u8",
                "s_ptr": "*fp16",
                "out_ptr": "*bf16",
                **ints("N", "stride_wn", "stride_sg", "stride_on"),
            },
            {"GROUP": 128, "BLOCK_N": 32},
            "dequant int4",
        )
    )
    attention = {
        "q_ptr": "*bf16",
        "k_ptr": "*bf16",
        "v_ptr": "*bf16",
        "slots_ptr": "*i32",
        "lens_ptr": "*i32",
        "out_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "final_ptr": "*bf16",
        "count_ptr": "*i32",
        "sm_scale_log2": "fp32",
        **ints(
            "stride_qb",
            "stride_qh",
            "stride_ks",
            "stride_kl",
            "stride_kh",
            "stride_vs",
            "stride_vl",
            "stride_vh",
            "stride_ob",
            "stride_oh",
            "stride_os",
            "stride_lb",
            "stride_lh",
            "stride_fb",
            "stride_fh",
        ),
    }
    for block_n, warps, stages in ((64, 8, 3), (128, 8, 2), (128, 8, 3)):
        consts = {"GROUP": 6, "BLOCK_H": 16, "HEAD_DIM": 128, "BLOCK_N": block_n, "DOT_FP32": False}
        results.append(
            compile_one(
                decode_attention._decode_split_kernel,
                attention,
                consts,
                f"attention GQA 48/8 block {block_n}",
                warps,
                stages,
            )
        )
    rotary_sig = {
        "q_ptr": "*bf16",
        "k_ptr": "*bf16",
        "v_ptr": "*bf16",
        "pos_ptr": "*i32",
        "slots_ptr": "*i32",
        "cos_ptr": "*bf16",
        "sin_ptr": "*bf16",
        "k_cache_ptr": "*bf16",
        "v_cache_ptr": "*bf16",
        **ints(
            "n_q_heads",
            "n_kv_heads",
            "stride_qt",
            "stride_qh",
            "stride_kt",
            "stride_kh",
            "stride_vt",
            "stride_vh",
            "stride_table",
            "stride_cs",
            "stride_cl",
            "stride_ch",
        ),
    }
    results.append(
        compile_one(
            rotary._rotary_write_kv_kernel,
            rotary_sig,
            {"BLOCK_QH": 64, "BLOCK_KH": 8, "HALF": 64},
            "rotary_write_kv",
        )
    )
    failures = results.count(False)
    print(f"{len(results) - failures} of {len(results)} compiled for sm_90")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
