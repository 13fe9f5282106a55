"""Compile the Triton optimizer kernels for sm_90 without a GPU and print, per kernel, its PTX instruction
counts as JSON. Run by tests/test_optim_triton.py in a subprocess: the tests themselves run with
TRITON_INTERPRET=1, under which kernels cannot be compiled."""

import collections
import inspect
import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from curvkern.optim import _triton_multi_tensor as multi_tensor
from curvkern.optim.biostatis import triton as biostatis
from curvkern.optim.hysterograd import triton as hysterograd

POINTERS = {  # every other argument is an int, or float64 where annotated so
    "addresses": "*i64",
    "chunks": "*i64",
    "numels": "*i64",
    "tensor_index": "*i64",
    "chunk_begin": "*i64",
    "partials": "*fp64",
    "sums": "*fp64",
    "memory": "*fp64",
    "neg_step_ptr": "*fp64",
    "stats_ptr": "*fp32",
    "decay_ptr": "*fp64",
    "tau_ptr": "*fp64",
    "ascent_ptr": "*fp64",
    "sqrt_bc2_ptr": "*fp64",
    "coef_ptr": "*fp64",
    "temp_ptr": "*fp32",
    "energy_ptr": "*fp32",
}


def instruction_counts(kernel, constexprs: dict, fp_fusion: bool = False, pointers: dict | None = None) -> dict:
    signature = {}
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        if name in constexprs:
            signature[name] = "constexpr"
        elif parameter.annotation in (tl.float64, "tl.float64"):
            signature[name] = "fp64"
        else:
            signature[name] = {**POINTERS, **(pointers or {})}.get(name, "i32")
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"enable_fp_fusion": fp_fusion},
    )
    return collections.Counter(
        re.findall(
            r"\b((?:ld|st)\.global[.\w]*|fma\.\w+\.f\d+|mul\.rn\.f\d+|"
            r"div\.\w+\.f\d+|sqrt\.\w+\.f\d+)",
            compiled.asm["ptx"],
        )
    )


def main():
    fp32 = dict(STATE_DTYPE=tl.float32, ALIGN=16, CHUNK=multi_tensor.CHUNK_SIZE, BLOCK=multi_tensor.BLOCK_SIZE)
    update = dict(fp32, PARAM_DTYPE=tl.float32, GRAD_DTYPE=tl.float32, NUM_MEMORIES=2)
    report = {
        "hysterograd_pass_a": instruction_counts(hysterograd._pass_a_kernel, dict(fp32, GRAD_DTYPE=tl.float32)),
        "hysterograd_pass_b": instruction_counts(
            hysterograd._pass_b_kernel, dict(fp32, PARAM_DTYPE=tl.float32, GRAD_DTYPE=tl.float32)
        ),
        "hysterograd_pass_b_bf16": instruction_counts(
            hysterograd._pass_b_kernel, dict(fp32, PARAM_DTYPE=tl.bfloat16, GRAD_DTYPE=tl.bfloat16)
        ),
        "hysterograd_accumulate": instruction_counts(
            hysterograd._accumulate_kernel, dict(SCALAR_DTYPE=tl.float32), pointers={"accumulator": "*fp32"}
        ),
        "biostatis_sums": instruction_counts(biostatis._sums_kernel, dict(fp32, GRAD_DTYPE=tl.float32)),
        "biostatis_update": instruction_counts(biostatis._update_kernel, update),
        "biostatis_update_fused": instruction_counts(biostatis._update_kernel, update, fp_fusion=True),
        "biostatis_update_fp64": instruction_counts(
            biostatis._update_kernel,
            dict(update, STATE_DTYPE=tl.float64, PARAM_DTYPE=tl.float64, GRAD_DTYPE=tl.float64),
        ),
        "per_tensor_sums": instruction_counts(
            multi_tensor.per_tensor_sums_kernel, dict(NUM_SUMS=6, SUMS_WIDTH=8, STATE_DTYPE=tl.float32)
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
