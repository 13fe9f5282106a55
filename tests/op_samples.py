"""Sample inputs for every op of ``torch.ops.curvkern``: what tests/test_ops.py runs ``torch.library.opcheck`` on.

``SAMPLES`` maps an op's name (as TORCH_LIBRARY registers it in csrc/registration.cpp, or
``torch.library.custom_op`` in curvkern/optim/*/triton.py: ``name`` for the default overload,
``name.overload`` for any other) to its samples. A sample is a name, its test id, and a
function building fresh arguments, since the ops write into some of them. Tensors are small; where it
matters an op gets fp32 and fp64 samples (the optimizer and cross-entropy ops bf16 and fp16 too), an empty
list or empty tensor where it accepts one, non-contiguous tensors where it accepts them, and sizes that are no
multiple of a vector (16 fp32 lanes) or of a 16 Ki-element work unit (csrc/multi_tensor.h).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

fp16, bf16, fp32, fp64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Sample:
    name: str
    make_args: Callable[[], tuple]


def registered_ops() -> list[str]:
    """Every op TORCH_LIBRARY(curvkern, ...) registered, by the names ``SAMPLES`` uses (needs curvkern._C loaded)."""
    prefix = "curvkern::"
    return sorted(name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def resolve(op_name: str) -> torch._ops.OpOverload:
    """``"stream_axpy_"`` -> ``torch.ops.curvkern.stream_axpy_.default``; ``"op.overload"`` -> that overload."""
    packet, _, overload = op_name.partition(".")
    return getattr(getattr(torch.ops.curvkern, packet), overload or "default")


def _ops():
    return torch.ops.curvkern


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- layouts ---------------------------------------------------------------------------------------------


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dimensions stored in reverse order: same shape, dense, other strides."""
    order = list(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """``t`` as every other element of a tensor twice its size: same shape, not dense."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t


# --- the bandwidth probe ---------------------------------------------------------------------------------


def _axpy(dtype, shape, seed=0):
    def make_args():
        gen = _generator(seed)
        a, b = (torch.randn(shape, generator=gen, dtype=fp64).to(dtype) for _ in range(2))
        return a, b, 2.0

    return make_args


# stream_axpy_ rejects non-contiguous tensors (tests/test_extension.py checks the error): no strided sample.
STREAM_AXPY_SAMPLES = [
    Sample("fp32-33", _axpy(fp32, 33)),
    Sample("fp64-33", _axpy(fp64, 33)),
    Sample("fp32-empty", _axpy(fp32, 0)),
    Sample("fp64-1", _axpy(fp64, 1)),
    Sample("fp32-2d-7x13", _axpy(fp32, (7, 13))),
]


# --- the optimizers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerCase:
    """One group of tensors for the optimizer ops: the parameters' dtype and shapes, and the layouts of the
    tensors an op writes and of those it only reads."""

    name: str
    dtype: torch.dtype
    shapes: tuple
    written_layout: Callable[[torch.Tensor], torch.Tensor] = _contiguous
    read_layout: Callable[[torch.Tensor], torch.Tensor] = _contiguous

    @property
    def state_dtype(self) -> torch.dtype:
        """The optimizer state's dtype: fp32 for bf16 and fp16 parameters (csrc/multi_tensor.h)."""
        return fp32 if self.dtype in (bf16, fp16) else self.dtype

    @property
    def scalar_dtype(self) -> torch.dtype:
        """HysteroGrad's group scalars (accumulator, τ, T, E), fp32 or fp64 (the optimizer makes them in the
        default dtype, whatever the parameters'): fp64 in the fp64 cases, so that both are checked."""
        return fp64 if self.dtype == fp64 else fp32

    def params(self, gen, device=CPU):
        return [
            self.written_layout(torch.randn(s, generator=gen, dtype=fp64).to(device, self.dtype)) for s in self.shapes
        ]

    def grads(self, gen, device=CPU):
        return [self.read_layout(torch.randn(s, generator=gen, dtype=fp64).to(device, self.dtype)) for s in self.shapes]

    def state_tensor(self, gen, shape, layout, device=CPU):
        return layout(torch.rand(shape, generator=gen, dtype=fp64).to(device, self.state_dtype))

    def state(self, gen, layout, device=CPU):
        return [self.state_tensor(gen, s, layout, device) for s in self.shapes]


OPTIMIZER_CASES = [
    OptimizerCase("fp32", fp32, (5, 33)),
    OptimizerCase("fp64", fp64, (5, 33)),
    OptimizerCase("bf16", bf16, (5, 33)),
    OptimizerCase("fp16", fp16, (5, 33)),
    OptimizerCase("fp32-empty-list", fp32, ()),
    OptimizerCase("fp32-empty-tensor", fp32, (0, 17)),
    OptimizerCase("fp32-two-work-units", fp32, (16385, 7)),  # 16 Ki + 1 elements: a second unit of one element
    # Written tensors dense in another order (walked as they are), read ones strided (copied first).
    OptimizerCase("fp64-non-contiguous", fp64, ((6, 5), (3, 11)), _column_major, _every_other),
    OptimizerCase("bf16-non-contiguous", bf16, ((6, 5), (3, 11)), _every_other, _column_major),
]


def _pass_a(case: OptimizerCase):
    def make_args():
        gen = _generator()
        metrics = case.state(gen, case.written_layout)
        return case.grads(gen), metrics, torch.zeros((), dtype=case.scalar_dtype), 0.9, 1e-7, 1.0

    return make_args


def _group_scalars(dtype, accumulator=4.0):
    """HysteroGrad's accumulator, τ, T and E as 0-dim ``dtype`` tensors."""
    return [torch.tensor(v, dtype=dtype) for v in (accumulator, 0.5, 0.9, 0.1)]


def _scalars(dtype, lr, *rest, accumulator=4.0):
    return lambda: (*_group_scalars(dtype, accumulator), lr(), *rest)


def _lr64():
    return torch.tensor(1e-3, dtype=fp64)


def _lr32_one_element():
    return torch.tensor([1e-3], dtype=fp32)


HYSTEROGRAD_SCALARS_SAMPLES = [
    # stiffening 0.01, adaptive, clipped to 1.0 (√4 > 1)
    Sample("fp32-clipped", _scalars(fp32, _lr64, 0.01, 0.9, 0.99, True, 1.0, 1.0)),
    # stiffening 0: the gate opens (pass B then moves the parameters)
    Sample("fp32-gate-open-no-clip", _scalars(fp32, _lr64, 0.0, 0.9, 0.99, True, None, 1.0)),
    Sample("fp64-clip-not-reached", _scalars(fp64, _lr64, 0.01, 0.9, 0.99, False, 10.0, 1.0)),
    Sample("fp64-lr-one-element-fp32", _scalars(fp64, _lr32_one_element, 1.0, 0.5, 0.9, True, None, 2.0)),
    Sample("fp32-zero-accumulator", _scalars(fp32, _lr64, 0.01, 0.9, 0.99, True, 1.0, 1.0, accumulator=0.0)),
]


def _pass_b(case: OptimizerCase, gate_open: bool = True):
    def make_args():
        gen = _generator()
        params, grads = case.params(gen), case.grads(gen)
        metrics = case.state(gen, case.read_layout)
        # What the scalar stage hands pass B: stiffening 0 opens the gate; a closed one leaves p untouched.
        stats, neg_step_size = _ops().hysterograd_scalars_(
            *_group_scalars(case.scalar_dtype), _lr64(), 0.0 if gate_open else 1e6, 0.9, 0.99, True, None, 1.0
        )
        assert bool(stats[2]) == gate_open
        return params, grads, metrics, stats, neg_step_size, 1e-7

    return make_args


def _moments(case: OptimizerCase, gen, layout):
    return case.state(gen, layout), case.state(gen, layout)


def _sums(case: OptimizerCase):
    def make_args():
        gen = _generator()
        return case.grads(gen), *_moments(case, gen, case.read_layout), 0.9, 0.999

    return make_args


def _biostatis_settings(memory_decays, memory_weights):
    """The BiostatisV6 ops' settings after lr, in schema order: betas, eps, weight_decay, homeo_rate,
    coherence_target, energy_target, lambda_energy, the memories, flip_threshold, ascent_strength."""
    return (0.9, 0.999, 1e-8, 0.01, 0.03, 0.8, 1e-3, 0.1, list(memory_decays), list(memory_weights), 0.2, 0.05)


def _update(case: OptimizerCase, memory_decays=(0.9, 0.99), memory_weights=(0.6, 0.4), step_dtype=fp32):
    def make_args():
        gen = _generator()
        params, grads = case.params(gen), case.grads(gen)
        exp_avgs, exp_avg_sqs = _moments(case, gen, case.written_layout)
        # Tensor-major: parameter 0's EMA per memory, then parameter 1's, ...
        emas = [case.state_tensor(gen, shape, case.written_layout) for shape in case.shapes for _ in memory_decays]
        steps = [torch.tensor(3 * i, dtype=step_dtype) for i in range(len(case.shapes))]
        # biostatis_sums of no tensors cannot be dispatched (see BIOSTATIS_SUMS_SAMPLES): its [0, 7] result here.
        sums = (
            _ops().biostatis_sums(grads, exp_avgs, exp_avg_sqs, 0.9, 0.999)
            if case.shapes
            else torch.zeros((0, 7), dtype=fp64)
        )
        return (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            emas,
            steps,
            sums,
            sums.sum(0),
            _lr64(),
            *_biostatis_settings(memory_decays, memory_weights),
        )

    return make_args


HYSTEROGRAD_PASS_A_SAMPLES = [Sample(case.name, _pass_a(case)) for case in OPTIMIZER_CASES]
HYSTEROGRAD_PASS_B_SAMPLES = [Sample(case.name, _pass_b(case)) for case in OPTIMIZER_CASES] + [
    Sample("fp32-gate-closed", _pass_b(OPTIMIZER_CASES[0], gate_open=False)),
]
# Empty lists leave biostatis_sums without a tensor argument, so the dispatcher finds no CPU kernel and raises
# NotImplementedError before the kernel (which would return an empty table) runs: no empty-list sample. The
# optimizers never call it with one.
BIOSTATIS_SUMS_SAMPLES = [Sample(case.name, _sums(case)) for case in OPTIMIZER_CASES if case.shapes]
BIOSTATIS_UPDATE_SAMPLES = [Sample(case.name, _update(case)) for case in OPTIMIZER_CASES] + [
    Sample("fp32-no-memories", _update(OPTIMIZER_CASES[0], memory_decays=(), memory_weights=())),
    Sample(
        "fp64-three-memories-int64-steps",
        _update(OPTIMIZER_CASES[1], (0.9, 0.99, 0.999), (0.5, 0.3, 0.2), step_dtype=torch.int64),
    ),
]


# --- the optimizers' Triton steps, one opaque op each under torch.compile ------------------------------------
#
# curvkern/optim/{hysterograd,biostatis}/triton.py register these (torch.library.custom_op) on import, and
# curvkern imports them only where Triton is installed: SAMPLES names them only there too. They run the Triton
# kernels: on CUDA where there is a GPU, else on CPU tensors through the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1). The optimizers never step a group without parameters (and the Biostatis step takes
# its device from the first one): no empty-list sample.

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_STEP_CASES = [case for case in OPTIMIZER_CASES if case.shapes]


def _lr_arguments(tensor_lr: bool):
    """``(lr_value, lr)`` as the ops take lr: a float, or a 0-dim fp64 tensor on the device."""
    return (0.0, torch.tensor(1e-3, dtype=fp64, device=TRITON_DEVICE)) if tensor_lr else (1e-3, None)


def _hysterograd_triton_step(
    case: OptimizerCase, tensor_lr=False, stiffening_factor=0.0, adaptive_threshold=True, grad_clip=None
):
    """One group's HysteroGrad step: stiffening 0 opens the gate (the parameters move); τ, T, E in the case's
    scalar dtype."""

    def make_args():
        gen, device = _generator(), TRITON_DEVICE
        params, grads = case.params(gen, device), case.grads(gen, device)
        metrics = case.state(gen, case.written_layout, device)
        tau, temp, energy = (torch.tensor(v, dtype=case.scalar_dtype, device=device) for v in (0.5, 0.9, 0.1))
        # stiffening_factor, beta, epsilon, cooling_rate, initial_temp, metric_scale, ..., hysteresis_scale
        return (
            params,
            grads,
            metrics,
            tau,
            temp,
            energy,
            *_lr_arguments(tensor_lr),
            stiffening_factor,
            0.9,
            1e-7,
            0.99,
            1.0,
            1.0,
            adaptive_threshold,
            grad_clip,
            1.0,
        )

    return make_args


def _biostatis_triton_step(case: OptimizerCase, tensor_lr=False, memory_decays=(0.9, 0.99), memory_weights=(0.6, 0.4)):
    def make_args():
        gen, device = _generator(), TRITON_DEVICE
        params, grads = case.params(gen, device), case.grads(gen, device)
        exp_avgs, exp_avg_sqs = (case.state(gen, case.written_layout, device) for _ in range(2))
        # Parameter-major: parameter 0's EMA per memory, then parameter 1's, ...
        emas = [
            case.state_tensor(gen, shape, case.written_layout, device) for shape in case.shapes for _ in memory_decays
        ]
        steps = [torch.tensor(3 * i, dtype=fp32, device=device) for i in range(len(case.shapes))]
        return (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            emas,
            steps,
            *_lr_arguments(tensor_lr),
            *_biostatis_settings(memory_decays, memory_weights),
        )

    return make_args


HYSTEROGRAD_TRITON_STEP_SAMPLES = [Sample(case.name, _hysterograd_triton_step(case)) for case in TRITON_STEP_CASES] + [
    Sample("fp32-tensor-lr-clipped", _hysterograd_triton_step(OPTIMIZER_CASES[0], tensor_lr=True, grad_clip=1.0)),
    Sample(
        "fp64-gate-closed",
        _hysterograd_triton_step(OPTIMIZER_CASES[1], stiffening_factor=1e6, adaptive_threshold=False),
    ),
]
BIOSTATIS_TRITON_STEP_SAMPLES = [Sample(case.name, _biostatis_triton_step(case)) for case in TRITON_STEP_CASES] + [
    Sample("fp32-tensor-lr", _biostatis_triton_step(OPTIMIZER_CASES[0], tensor_lr=True)),
    Sample("fp32-no-memories", _biostatis_triton_step(OPTIMIZER_CASES[0], memory_decays=(), memory_weights=())),
    Sample("fp64-three-memories", _biostatis_triton_step(OPTIMIZER_CASES[1], (0.9, 0.99, 0.999), (0.5, 0.3, 0.2))),
]


# --- cross-entropy ---------------------------------------------------------------------------------------


def _accumulation_dtype(dtype):
    return fp64 if dtype == fp64 else fp32


@dataclass(frozen=True)
class CrossEntropyCase:
    """An (N, V) problem: logits and u of ``dtype``, row 1 ignored; ``row_stride`` > V stores each row inside
    a wider one (the last dimension stays dense, as the kernels require)."""

    name: str
    dtype: torch.dtype
    rows: int = 6
    classes: int = 9
    row_stride: int | None = None

    def problem(self, ignore_index=-100):
        """(logits, target, u), seeded."""
        gen = _generator()
        logits = (3.0 * torch.randn(self.rows, self.classes, generator=gen, dtype=fp64)).to(self.dtype)
        target = torch.randint(0, self.classes, (self.rows,), generator=gen)
        target[1:2] = ignore_index
        u = torch.randn(self.rows, self.classes, generator=gen, dtype=fp64).to(self.dtype)
        return self.strided(logits), target, self.strided(u)

    def strided(self, t):
        if self.row_stride is None:
            return t
        wide = torch.full((t.shape[0], self.row_stride), float("nan"), dtype=t.dtype)
        wide[:, 2 : 2 + t.shape[1]] = t
        return wide[:, 2 : 2 + t.shape[1]]

    def out(self, logits):
        return self.strided(torch.empty(logits.shape, dtype=logits.dtype))

    def scale(self, per_row: bool):
        """grad_scale / scale: 0-dim, or one per row."""
        acc = _accumulation_dtype(self.dtype)
        return torch.rand(self.rows, generator=_generator(1), dtype=acc) if per_row else torch.tensor(0.5, dtype=acc)


CE_CASES = [
    CrossEntropyCase("fp32", fp32),
    CrossEntropyCase("fp64", fp64),
    CrossEntropyCase("bf16", bf16),
    CrossEntropyCase("fp16", fp16),
    CrossEntropyCase("fp32-empty-batch", fp32, rows=0),
    CrossEntropyCase("fp32-37-classes", fp32, rows=5, classes=37),  # two vectors and a remainder per row
    CrossEntropyCase("fp64-row-stride-16", fp64, row_stride=16),
    CrossEntropyCase("bf16-row-stride-16", bf16, row_stride=16),
]


def _variant_args(variants: tuple, logits: torch.Tensor) -> tuple:
    """The ops' (z_loss, softcap[, weight]) arguments, ``"weight"`` standing for (V,) class weights in the
    logits' dtype."""
    weights = torch.linspace(0.5, 1.5, logits.shape[1], dtype=torch.float64).to(logits.dtype)
    return tuple(weights if value == "weight" else value for value in variants)


def _soft_target(case: CrossEntropyCase) -> torch.Tensor:
    """(N, V) probability targets in the case's dtype, rows summing to 1.3 (F.cross_entropy takes any
    non-negative row), stored inside wider rows like the case's logits."""
    probs = 1.3 * torch.softmax(torch.randn(case.rows, case.classes, generator=_generator(2), dtype=fp64), dim=1)
    return case.strided(probs.to(case.dtype))


def _forward(case: CrossEntropyCase, ignore_index=-100, label_smoothing=0.1, variants=(), soft=False):
    """``soft``: probability targets (_soft_target) instead of class indices."""

    def make_args():
        logits, target, _ = case.problem(ignore_index)
        target = _soft_target(case) if soft else target
        return logits, target, ignore_index, label_smoothing, *_variant_args(variants, logits)

    return make_args


def _backward(
    case: CrossEntropyCase, per_row_scale: bool, scale_layout=_contiguous, variants=(), label_smoothing=0.1, soft=False
):
    def make_args():
        logits, target, _ = case.problem()
        target = _soft_target(case) if soft else target
        extra = _variant_args(variants, logits)
        _, lse = _ops().cross_entropy_forward(logits, target, -100, label_smoothing, *extra)
        return logits, target, lse, scale_layout(case.scale(per_row_scale)), -100, label_smoothing, *extra

    return make_args


def _hvp(
    case: CrossEntropyCase,
    per_row_scale: bool,
    label_smoothing=0.1,
    shift_period=0,
    stream_out=False,
    broadcast_u=False,
    variants=(),
    tangents=None,
    soft=False,
):
    """``tangents`` K: u and out (K, N, V), tangent k being u + k (the first one strided like the case's);
    ``soft``: probability targets."""

    def make_args():
        logits, target, u = case.problem()
        target = _soft_target(case) if soft else target
        if broadcast_u:  # one row of u for every row: row stride 0
            u = u[2:3].expand(u.shape)
        out = case.out(logits)
        if tangents is not None:
            u = torch.stack([u + k for k in range(tangents)]) if tangents else u.new_empty(0, *u.shape)
            out = torch.empty_like(u)
        return (
            logits,
            target,
            u,
            case.scale(per_row_scale),
            -100,
            label_smoothing,
            shift_period,
            stream_out,
            out,
            *_variant_args(variants, logits),
        )

    return make_args


def _scale_name(per_row: bool) -> str:
    return "scale-per-row" if per_row else "scale-0-dim"


# The loss variants' (z_loss, softcap) arguments, softcap 0 meaning no cap.
CE_VARIANTS = [("z-loss", (0.01, 0.0)), ("softcap", (0.0, 3.0)), ("z-loss-softcap", (0.01, 3.0))]
# Class weights (without label smoothing), alone and with the other two.
CE_WEIGHTED = [("weight", (0.0, 0.0, "weight")), ("weight-z-loss-softcap", (0.01, 3.0, "weight"))]
# Class weights with label smoothing (the samples' 0.1), and probability targets: the dense targets.
CE_WEIGHT_SMOOTHING = [
    ("weight-smoothing", (0.0, 0.0, "weight")),
    ("weight-smoothing-z-loss-softcap", (0.01, 3.0, "weight")),
]
CE_SOFT = [("soft", ()), ("soft-z-loss-softcap", (0.01, 3.0)), ("soft-weight-z-loss-softcap", (0.01, 3.0, "weight"))]
# fp32, fp64, bf16, an empty batch and rows inside wider ones (the probabilities' rows too).
CE_DENSE_CASES = [CE_CASES[i] for i in (0, 1, 2, 4, 6)]
CROSS_ENTROPY_FORWARD_SAMPLES = (
    [Sample(case.name, _forward(case)) for case in CE_CASES]
    + [
        Sample("fp32-no-smoothing-ignore-index-2", _forward(CE_CASES[0], ignore_index=2, label_smoothing=0.0)),
        Sample("fp64-full-smoothing", _forward(CE_CASES[1], label_smoothing=1.0)),
    ]
    + [
        Sample(f"{case.name}-{label}", _forward(case, variants=variants))
        for case in CE_CASES[:3]
        for label, variants in CE_VARIANTS
    ]
    + [
        Sample(f"{case.name}-{label}", _forward(case, label_smoothing=0.0, variants=variants))
        for case in CE_CASES[:3]
        for label, variants in CE_WEIGHTED
    ]
    + [
        Sample(f"{case.name}-{label}", _forward(case, variants=variants))
        for case in CE_DENSE_CASES
        for label, variants in CE_WEIGHT_SMOOTHING
    ]
    + [
        Sample(f"{case.name}-{label}", _forward(case, variants=variants, soft=True))
        for case in CE_DENSE_CASES
        for label, variants in CE_SOFT
    ]
)
CROSS_ENTROPY_BACKWARD_SAMPLES = (
    [
        Sample(f"{case.name}-{_scale_name(per_row)}", _backward(case, per_row))
        for case in CE_CASES
        for per_row in (False, True)
    ]
    + [Sample("fp32-scale-per-row-strided", _backward(CE_CASES[0], True, _every_other))]
    + [
        Sample(f"{case.name}-{label}", _backward(case, True, variants=variants))
        for case in CE_CASES[:3]
        for label, variants in CE_VARIANTS
    ]
    + [
        Sample(f"{case.name}-{label}", _backward(case, True, variants=variants, label_smoothing=0.0))
        for case in CE_CASES[:3]
        for label, variants in CE_WEIGHTED
    ]
    + [
        Sample(f"{case.name}-{label}", _backward(case, True, variants=variants))
        for case in CE_DENSE_CASES
        for label, variants in CE_WEIGHT_SMOOTHING
    ]
    + [
        Sample(f"{case.name}-{label}", _backward(case, True, variants=variants, soft=True))
        for case in CE_DENSE_CASES
        for label, variants in CE_SOFT
    ]
)
CROSS_ENTROPY_HVP_SAMPLES = (
    [
        Sample(f"{case.name}-{_scale_name(per_row)}", _hvp(case, per_row))
        for case in CE_CASES
        for per_row in (False, True)
    ]
    + [
        # The causal shift (period 3 divides the 6 rows) and a request for streaming stores (taken past 64 MiB only).
        Sample(
            f"{case.name}-shift-3-stream-out", _hvp(case, True, label_smoothing=0.0, shift_period=3, stream_out=True)
        )
        for case in CE_CASES
        if case.rows == 6
    ]
    + [Sample("fp32-u-broadcast", _hvp(CE_CASES[0], False, broadcast_u=True))]
    + [
        Sample(f"{case.name}-{label}", _hvp(case, True, variants=variants))
        for case in CE_CASES[:3]
        for label, variants in CE_VARIANTS
    ]
    + [Sample("fp32-shift-3-z-loss-softcap", _hvp(CE_CASES[0], False, shift_period=3, variants=(0.01, 3.0)))]
    + [
        Sample(f"{case.name}-{k}-tangents", _hvp(case, True, tangents=k, variants=variants))
        for case in (CE_CASES[0], CE_CASES[1], CE_CASES[4])
        for k, variants in ((3, ()), (0, ()), (2, (0.01, 3.0)))
    ]
    + [
        Sample(f"{case.name}-{label}", _hvp(case, True, label_smoothing=0.0, variants=variants))
        for case in CE_CASES[:3]
        for label, variants in CE_WEIGHTED
    ]
    + [
        Sample(f"{case.name}-{label}", _hvp(case, True, variants=variants))
        for case in CE_DENSE_CASES
        for label, variants in CE_WEIGHT_SMOOTHING
    ]
    + [
        Sample(f"{case.name}-{label}", _hvp(case, True, variants=variants, soft=True))
        for case in CE_DENSE_CASES
        for label, variants in CE_SOFT
    ]
    + [Sample("fp32-soft-u-broadcast", _hvp(CE_CASES[0], False, broadcast_u=True, soft=True))]
    + [
        # K tangents: each further tangent's sums over d⊙u from the kept exps (tangent_sums).
        Sample(f"{case.name}-{k}-tangents-{label}", _hvp(case, True, tangents=k, variants=variants, soft=soft))
        for case in (CE_CASES[0], CE_CASES[1])
        for k in (3, 0)
        for label, variants, soft in (
            ("weight-smoothing-z-loss-softcap", (0.01, 3.0, "weight"), False),
            ("weight-smoothing", (0.0, 0.0, "weight"), False),
            ("soft-weight-z-loss-softcap", (0.01, 3.0, "weight"), True),
            ("soft", (), True),
        )
    ]
)

# The case's columns as the shard at offset 3 of a row 5 classes wider: the labels (in [0, V)) below 3 fall
# in another shard, the others in this one.
SHARD_OFFSET = 3


def _shard_total(case: CrossEntropyCase) -> int:
    return case.classes + 5


def _partial_stats(case: CrossEntropyCase, with_u: bool, label_smoothing=0.1):
    def make_args():
        logits, target, u = case.problem()
        return logits, target, u if with_u else None, -100, label_smoothing, SHARD_OFFSET, _shard_total(case)

    return make_args


def _shard_backward(case: CrossEntropyCase, per_row_scale: bool):
    def make_args():
        logits, target, _ = case.problem()
        lse = torch.logsumexp(logits.to(_accumulation_dtype(case.dtype)), dim=1) + 1.0
        return logits, target, lse, case.scale(per_row_scale), -100, 0.1, SHARD_OFFSET, _shard_total(case)

    return make_args


def _shard_hvp(case: CrossEntropyCase, per_row_scale: bool):
    def make_args():
        logits, target, u = case.problem()
        acc = _accumulation_dtype(case.dtype)
        lse = torch.logsumexp(logits.to(acc), dim=1) + 1.0
        p_dot_u = torch.rand(case.rows, generator=_generator(2), dtype=acc)
        return logits, target, u, lse, p_dot_u, case.scale(per_row_scale), -100, _shard_total(case), case.out(logits)

    return make_args


CROSS_ENTROPY_PARTIAL_STATS_SAMPLES = [
    Sample(f"{case.name}-{'u' if with_u else 'logits'}", _partial_stats(case, with_u))
    for case in CE_CASES
    for with_u in (False, True)
] + [Sample("fp64-u-no-smoothing", _partial_stats(CE_CASES[1], True, label_smoothing=0.0))]
CROSS_ENTROPY_SHARD_BACKWARD_SAMPLES = [
    Sample(f"{case.name}-{_scale_name(per_row)}", _shard_backward(case, per_row))
    for case in CE_CASES
    for per_row in (False, True)
]
CROSS_ENTROPY_SHARD_HVP_SAMPLES = [
    Sample(f"{case.name}-{_scale_name(per_row)}", _shard_hvp(case, per_row))
    for case in CE_CASES
    for per_row in (False, True)
]


# --- linear cross-entropy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCrossEntropyCase:
    """hidden (rows, d), weight (V, d) stored as ``layout`` makes it, bias or none; tiles of 3 × 4 (several of
    each, the last partial) unless ``rows`` is 0."""

    name: str
    dtype: torch.dtype
    rows: int = 7
    with_bias: bool = True
    layout: Callable[[torch.Tensor], torch.Tensor] = _contiguous
    d: int = 5
    classes: int = 11

    def problem(self, gen):
        hidden = torch.randn(self.rows, self.d, generator=gen, dtype=fp64).to(self.dtype)
        weight = self.layout(torch.randn(self.classes, self.d, generator=gen, dtype=fp64).to(self.dtype))
        bias = torch.randn(self.classes, generator=gen, dtype=fp64).to(self.dtype) if self.with_bias else None
        target = torch.randint(0, self.classes, (self.rows,), generator=gen)
        if self.rows:
            target[1] = -100
        return hidden, weight, bias, target

    def rows_vector(self, gen):
        return torch.rand(self.rows, generator=gen, dtype=fp64).to(_accumulation_dtype(self.dtype))

    def scale(self, gen, per_row: bool):
        return self.rows_vector(gen) if per_row else torch.tensor(0.3, dtype=_accumulation_dtype(self.dtype))


LINEAR_CE_CASES = [
    LinearCrossEntropyCase("fp32", fp32),
    LinearCrossEntropyCase("fp64", fp64),
    LinearCrossEntropyCase("bf16", bf16),
    LinearCrossEntropyCase("fp32-no-bias-weight-column-major", fp32, with_bias=False, layout=_column_major),
    LinearCrossEntropyCase("fp64-weight-strided", fp64, layout=_every_other),
    LinearCrossEntropyCase("fp32-no-rows", fp32, rows=0),
]
LINEAR_CE_TILES = (3, 4)
# The loss variants' (z_loss, softcap, class_weight) arguments with label smoothing, all three at once.
LINEAR_CE_VARIANTS = (0.01, 3.0, "weight")


def _linear_variant_args(variants: tuple, case: LinearCrossEntropyCase) -> tuple:
    """The ops' (z_loss, softcap, class_weight) arguments, ``"weight"`` standing for (V,) class weights in the
    accumulation dtype."""
    weights = torch.linspace(0.5, 1.5, case.classes, dtype=fp64).to(_accumulation_dtype(case.dtype))
    return tuple(weights if value == "weight" else value for value in variants)


def _linear_forward(case: LinearCrossEntropyCase, variants=()):
    def make_args():
        return (*case.problem(_generator()), -100, 0.1, *LINEAR_CE_TILES, *_linear_variant_args(variants, case))

    return make_args


def _linear_backward(case: LinearCrossEntropyCase, per_row: bool, variants=()):
    def make_args():
        gen = _generator()
        return (
            *case.problem(gen),
            case.rows_vector(gen),
            case.scale(gen, per_row),
            -100,
            0.1,
            *LINEAR_CE_TILES,
            *_linear_variant_args(variants, case),
        )

    return make_args


def _linear_hvp(case: LinearCrossEntropyCase, per_row: bool, parts=("hidden", "weight", "bias"), variants=()):
    def make_args():
        gen = _generator()
        hidden, weight, bias, target = case.problem(gen)
        tangents = [
            torch.randn(x.shape, generator=gen, dtype=fp64).to(case.dtype) if x is not None and name in parts else None
            for name, x in zip(("hidden", "weight", "bias"), (hidden, weight, bias))
        ]
        lse, scale = case.rows_vector(gen), case.scale(gen, per_row)
        return (
            hidden,
            weight,
            bias,
            target,
            lse,
            scale,
            *tangents,
            -100,
            0.1,
            *LINEAR_CE_TILES,
            *_linear_variant_args(variants, case),
        )

    return make_args


def _linear_ggn_vp(case: LinearCrossEntropyCase, per_row: bool, tangents=2, parts=("weight", "bias"), variants=()):
    def make_args():
        gen = _generator()
        hidden, weight, bias, target = case.problem(gen)

        def tangent(x, name):
            if x is None or name not in parts:
                return None
            return torch.randn(tangents, *x.shape, generator=gen, dtype=fp64).to(case.dtype)

        d_hidden = torch.randn(tangents, *hidden.shape, generator=gen, dtype=fp64).to(case.dtype)
        scale = case.scale(gen, per_row)
        d_weight, d_bias = tangent(weight, "weight"), tangent(bias, "bias")
        # The label smoothing enters only with variants.
        smoothing = (0.1, *_linear_variant_args(variants, case)) if variants else ()
        return (hidden, weight, bias, target, scale, d_hidden, d_weight, d_bias, -100, *LINEAR_CE_TILES, *smoothing)

    return make_args


# The variants on the fp32, fp64 and bf16 cases.
LINEAR_CE_VARIANT_CASES = LINEAR_CE_CASES[:3]
LINEAR_CROSS_ENTROPY_FORWARD_SAMPLES = [Sample(case.name, _linear_forward(case)) for case in LINEAR_CE_CASES] + [
    Sample(f"{case.name}-variants", _linear_forward(case, variants=LINEAR_CE_VARIANTS))
    for case in LINEAR_CE_VARIANT_CASES
]
LINEAR_CROSS_ENTROPY_BACKWARD_SAMPLES = [
    Sample(f"{case.name}-{_scale_name(per_row)}", _linear_backward(case, per_row))
    for case in LINEAR_CE_CASES
    for per_row in (False, True)
] + [
    Sample(f"{case.name}-variants", _linear_backward(case, True, variants=LINEAR_CE_VARIANTS))
    for case in LINEAR_CE_VARIANT_CASES
]
LINEAR_CROSS_ENTROPY_HVP_SAMPLES = (
    [
        Sample(f"{case.name}-{_scale_name(per_row)}", _linear_hvp(case, per_row))
        for case in LINEAR_CE_CASES
        for per_row in (False, True)
    ]
    + [
        Sample("fp64-v-hidden-only", _linear_hvp(LINEAR_CE_CASES[1], True, parts=("hidden",))),
        Sample("fp32-v-bias-only", _linear_hvp(LINEAR_CE_CASES[0], False, parts=("bias",))),
    ]
    + [
        Sample(f"{case.name}-variants", _linear_hvp(case, True, variants=LINEAR_CE_VARIANTS))
        for case in LINEAR_CE_VARIANT_CASES
    ]
)
LINEAR_CE_GGN_VP_SAMPLES = (
    [
        Sample(f"{case.name}-{_scale_name(per_row)}", _linear_ggn_vp(case, per_row))
        for case in LINEAR_CE_CASES
        for per_row in (False, True)
    ]
    + [
        Sample("fp64-d-hidden-only-k-1", _linear_ggn_vp(LINEAR_CE_CASES[1], False, tangents=1, parts=())),
        Sample("fp32-k-0", _linear_ggn_vp(LINEAR_CE_CASES[0], True, tangents=0)),
    ]
    + [
        Sample(f"{case.name}-variants", _linear_ggn_vp(case, True, variants=LINEAR_CE_VARIANTS))
        for case in LINEAR_CE_VARIANT_CASES
    ]
)


# --- no tensors ------------------------------------------------------------------------------------------

NO_ARGUMENTS = [Sample("no-arguments", lambda: ())]


SAMPLES: dict[str, list[Sample]] = {
    "cpu_capability": NO_ARGUMENTS,
    "cpu_capabilities": NO_ARGUMENTS,
    "stream_axpy_": STREAM_AXPY_SAMPLES,
    "hysterograd_pass_a_": HYSTEROGRAD_PASS_A_SAMPLES,
    "hysterograd_scalars_": HYSTEROGRAD_SCALARS_SAMPLES,
    "hysterograd_pass_b_": HYSTEROGRAD_PASS_B_SAMPLES,
    "biostatis_sums": BIOSTATIS_SUMS_SAMPLES,
    "biostatis_update_": BIOSTATIS_UPDATE_SAMPLES,
    "cross_entropy_forward": CROSS_ENTROPY_FORWARD_SAMPLES,
    "cross_entropy_backward": CROSS_ENTROPY_BACKWARD_SAMPLES,
    "cross_entropy_hvp_": CROSS_ENTROPY_HVP_SAMPLES,
    "cross_entropy_partial_stats": CROSS_ENTROPY_PARTIAL_STATS_SAMPLES,
    "cross_entropy_shard_backward": CROSS_ENTROPY_SHARD_BACKWARD_SAMPLES,
    "cross_entropy_shard_hvp_": CROSS_ENTROPY_SHARD_HVP_SAMPLES,
    "linear_cross_entropy_forward": LINEAR_CROSS_ENTROPY_FORWARD_SAMPLES,
    "linear_cross_entropy_backward": LINEAR_CROSS_ENTROPY_BACKWARD_SAMPLES,
    "linear_cross_entropy_hvp": LINEAR_CROSS_ENTROPY_HVP_SAMPLES,
    "linear_ce_ggn_vp": LINEAR_CE_GGN_VP_SAMPLES,
}
if TRITON_INSTALLED:
    SAMPLES |= {
        "hysterograd_triton_step_": HYSTEROGRAD_TRITON_STEP_SAMPLES,
        "biostatis_triton_step_": BIOSTATIS_TRITON_STEP_SAMPLES,
    }
