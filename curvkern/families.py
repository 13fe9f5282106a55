"""The kernel families: what each kind of family promises its callers, and the one registry of families.

A kernel family is one computation with the same semantics on every backend: an optimizer's step
(``"hysterograd"``, ``"biostatis"``), a loss with its derivatives (``"cross_entropy"``) or a loss of a
linear layer's output with its derivatives (``"linear_cross_entropy"``). Each backend registers its
implementation with :func:`curvkern._dispatch.register`, and every implementation of a family satisfies its
kind's Protocol (:class:`OptimizerStep`, :class:`LossKernels`, :class:`LinearLossKernels`), taking the
family's hyperparameter record (:mod:`curvkern.hyperparameters`).

:data:`FAMILIES` is the one list of families: the dispatch refuses a name not in it
(:func:`get_family` raises ValueError naming the known ones), and the tests, the benchmarks and the main
job (``python -m curvkern.bench``) iterate over it rather than over lists of their own. CONTRIBUTING.md
says what a new family needs.

This module imports no family's package (each imports the dispatch, which imports this module); a
family's public class or function is resolved by name when first asked for (:attr:`Family.api`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import torch

from curvkern.hyperparameters import (
    BiostatisHyperparameters,
    CrossEntropyHyperparameters,
    CrossEntropyLossHyperparameters,
    HysteroGradHyperparameters,
)

if TYPE_CHECKING:
    from curvkern.optim._distributed import GroupReduction

BACKENDS = ("eager", "cpp", "triton")
OPTIMIZER = "optimizer"
LOSS = "loss"
LINEAR_LOSS = "linear_loss"

StateT = TypeVar("StateT", contravariant=True)
HyperparametersT = TypeVar("HyperparametersT", contravariant=True)
StatsT = TypeVar("StatsT", covariant=True)


class OptimizerStep(Protocol[StateT, HyperparametersT, StatsT]):
    """What each backend of an optimizer family registers: one param group's step, in place.

    - ``params``: the group's parameters that have a gradient, in group order; plain strided tensors
      (any strides) of float16, bfloat16, float32 or float64 on one device, dtypes possibly mixed.
    - ``grads``: one per parameter, of its shape, dtype and device (any strides).
    - ``state``: the family's state record (:class:`HysteroGradState`, :class:`BiostatisState`): per
      parameter, tensors of its shape in its state dtype (float32 for a float16 or bfloat16 parameter,
      its own dtype otherwise), and the group's scalars. Created by the optimizer, updated here in place.
    - ``hyperparameters``: the family's record, built from the param group for this step; its ``lr`` is
      a float or a 0-dim tensor on the parameters' device.

    - ``reduce_partials``: None, or (with the optimizer's ``process_group``, or for a group of DTensor
      parameters, whose local shards the lists then hold) a
      :class:`~curvkern.optim._distributed.GroupReduction` the step calls once, between pass A and the
      scalar stage; the scalar stage reads what it returns, summed over the ranks. HysteroGrad calls it on
      the 0-dim Σu², taken over the tensors its ``counted`` marks (all when None); BiostatisV6 calls its
      ``tensor_and_group_sums`` on the float64 ``[n, 7]`` rows (element count, then the six sums). The lists
      may be empty: the rank still joins the sum.

    Updates ``params`` and ``state`` in place and returns the family's per-group statistics as device
    tensors (HysteroGrad: ``[N̂, h, gate]`` in the group scalars' dtype; BiostatisV6:
    ``BiostatisScalars``, float64). It reads nothing back to the host, so a whole step can be captured
    in a CUDA graph. It raises nothing for inputs the optimizer has checked (``_check_step_inputs``:
    shapes, dtypes, devices, layouts); the C++ ops and the Triton chunk table check again what they
    address and raise RuntimeError otherwise.
    """

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: StateT,
        hyperparameters: HyperparametersT,
        reduce_partials: GroupReduction | None = None,
    ) -> StatsT: ...


class LossKernels(Protocol[HyperparametersT]):
    """What each backend of a loss family registers: a class whose static methods are kernels on
    (N, V) rows, V classes last: ``forward``, ``backward`` and ``hvp`` for whole rows, and
    ``partial_stats``, ``shard_backward`` and ``shard_hvp`` for rows whose V classes are one shard
    (columns ``class_offset`` to ``class_offset + V`` of ``num_classes``) of a vocabulary-parallel row,
    the row statistics reduced across the shards between them (``curvkern/ce/vocab_parallel.py``).

    For every method: ``logits`` is (N, V) of float32, float64, bfloat16 or float16 with a dense last
    dimension (stride 1; rows at any stride); ``target`` is (N,) int64, contiguous, of class indices in
    [0, V) or ``hyperparameters.ignore_index``, on the logits' device. "acc" is the accumulation dtype:
    float64 for float64 logits, float32 otherwise. Scales are device tensors, so no kernel reads a number
    back to the host. ``hyperparameters.reduction`` is not the kernels' business: it arrives as the scale.
    A label outside [0, V) other than the ignore index gives NaN for its row (the public functions
    refuse it on CPU tensors first).
    """

    @staticmethod
    def forward(
        logits: torch.Tensor, target: torch.Tensor, hyperparameters: HyperparametersT
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_rows, lse)``: the per-row loss ℓ_r (0 on ignored rows) and log-sum-exp, both (N,) in
        acc."""
        ...

    @staticmethod
    def backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: HyperparametersT,
    ) -> torch.Tensor:
        """The gradient ``grad_scale_r · (p_r − q_r)``, (N, V) contiguous in the logits' dtype, exactly 0
        on ignored rows; ``lse`` is forward's, ``grad_scale`` a 0-dim or (N,) acc tensor on the device."""
        ...

    @staticmethod
    def hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        scale: torch.Tensor,
        hyperparameters: HyperparametersT,
        shift_period: int,
        out: torch.Tensor,
        out_is_callers: bool = False,
    ) -> torch.Tensor:
        """Write ``scale_r · (p_r ⊙ u_r − p_r ⟨p_r, u_r⟩)`` into ``out`` (exactly 0 on ignored rows) and
        return ``dot_r = ⟨u_r, p_r − q_r⟩`` (N,) in acc (0 on ignored rows): what the gradient of the
        loss's incoming gradient needs.

        ``u`` and ``out`` are (N, V) in the logits' dtype, last dimension dense, or (K, N, V) for K tangents:
        each row's softmax is then computed once for all K and ``dot`` is (K, N); ``scale`` a 0-dim or (N,)
        acc tensor. ``shift_period`` T > 0 is the causal-LM shift: row r takes its label from
        ``target[r + 1]`` and is ignored when ``(r + 1) % T == 0``; 0 means row r takes ``target[r]``.
        ``out_is_callers`` says ``out`` is a buffer the caller passed in rather than one just allocated
        (the C++ kernel then writes large float32 results with streaming stores).
        """
        ...

    @staticmethod
    def partial_stats(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor | None,
        class_offset: int,
        num_classes: int,
        hyperparameters: HyperparametersT,
    ) -> torch.Tensor:
        """This shard's part of each row's statistics, (N, 5) contiguous in acc; with w = ``u`` when given
        (same layout as the logits) and w = the logits otherwise, the columns are

        0. m, the shard's max logit (−inf for an empty shard);
        1. Σ_j e^{z_j − m} (shifted by 0 where m = −inf);
        2. Σ_j e^{z_j − m}·u_j, or 0 without ``u``;
        3. w at the row's label where the label falls in this shard (``class_offset`` ≤ y <
           ``class_offset + V``), 0 where it falls in another shard, NaN where it is outside
           [0, ``num_classes``);
        4. Σ_j w_j when ``hyperparameters.label_smoothing`` ≠ 0, else 0.

        Ignored rows are all 0 and are not read. Raises (ValueError on the Python backends, RuntimeError
        from the C++ op) for tensors of the wrong shape, dtype or device, and for a shard that does not
        fit in ``num_classes``."""
        ...

    @staticmethod
    def shard_backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        class_offset: int,
        num_classes: int,
        hyperparameters: HyperparametersT,
    ) -> torch.Tensor:
        """:meth:`backward` on one shard, given the whole row's log-sum-exp ``lse`` ((N,) acc):
        ``grad_scale_r · (e^{z − lse_r} − q_r)`` over this shard's classes, with q's label term where the
        label falls in this shard and α / ``num_classes`` everywhere; (N, V) contiguous, 0 on ignored rows,
        NaN on rows whose label is outside [0, ``num_classes``). Raises as :meth:`partial_stats`."""
        ...

    @staticmethod
    def shard_hvp(
        logits: torch.Tensor,
        target: torch.Tensor,
        u: torch.Tensor,
        lse: torch.Tensor,
        p_dot_u: torch.Tensor,
        scale: torch.Tensor,
        num_classes: int,
        hyperparameters: HyperparametersT,
        out: torch.Tensor,
    ) -> None:
        """:meth:`hvp`'s write on one shard, given the whole row's ``lse`` and ⟨p, u⟩ (``p_dot_u``), both
        (N,) acc: ``out = scale_r · e^{z − lse_r} ⊙ (u_r − ⟨p_r, u_r⟩)``, 0 on ignored rows (not read),
        NaN on rows whose label is outside [0, ``num_classes``). ``u`` and ``out`` as in :meth:`hvp`.
        Raises as :meth:`partial_stats`."""
        ...


class LinearLossKernels(Protocol[HyperparametersT]):
    """What each backend of a linear-loss family registers: a class whose four static methods are kernels on
    the logits z = hidden·weightᵀ + bias of N rows and V classes, which they compute tile by tile and never
    hold whole (no tensor of N·V elements).

    For every method: ``hidden`` is (N, d), ``weight`` (V, d), ``bias`` (V) or None, any strides, of one
    dtype (float32, float64 or bfloat16) on one device; ``target`` is (N,) int64, contiguous, of class
    indices in [0, V) or ``hyperparameters.ignore_index``. "acc" is the accumulation dtype: float64 for
    float64 inputs, float32 otherwise; products and sums are formed in it and results rounded once. Scales
    are 0-dim or (N,) acc device tensors (the reduction's weight; ``hyperparameters.reduction`` is not the
    kernels' business), and a row whose target is the ignore index counts with scale 0. No kernel reads a
    number back to the host. q_r = (1 − α)·e_y + α/V is the smoothed target, p_r = softmax(z_r).
    """

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        hyperparameters: HyperparametersT,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_rows, lse)``, both (N,) in acc: ℓ_r (0 on ignored rows, NaN for a label outside [0, V))
        and log Σ_j exp z_rj."""
        ...

    @staticmethod
    def backward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        hyperparameters: HyperparametersT,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """With g_z = s_r·(p_r − q_r) (s = ``grad_scale``, ``lse`` forward's): ``(g_z·W, g_zᵀ·h, Σ_r g_z)`` of
        the shapes and dtype of hidden, weight and bias (None when bias is None)."""
        ...

    @staticmethod
    def hvp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_scale: torch.Tensor,
        v_hidden: torch.Tensor | None,
        v_weight: torch.Tensor | None,
        v_bias: torch.Tensor | None,
        hyperparameters: HyperparametersT,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The double backward along the tangents (of hidden's, weight's and bias's shapes and dtype; None
        is 0): with u = v_h·Wᵀ + h·v_Wᵀ + v_b and (H u)_r = s_r·p_r ⊙ (u_r − ⟨p_r, u_r⟩), returns
        ``((H u)·W + g_z·v_W, (H u)ᵀ·h + g_zᵀ·v_h, Σ_r (H u)_r, dot)`` (the third None without bias) in the
        inputs' dtype, and ``dot`` (N,) in acc: ⟨p_r − q_r, u_r⟩, 0 on ignored rows."""
        ...

    @staticmethod
    def ggn_vp(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        scale: torch.Tensor,
        d_hidden: torch.Tensor,
        d_weight: torch.Tensor | None,
        d_bias: torch.Tensor | None,
        hyperparameters: HyperparametersT,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The Gauss-Newton product Jᵀ H_z J for K tangents: ``d_hidden`` (K, N, d), ``d_weight`` (K, V, d)
        or None, ``d_bias`` (K, V) or None, in the inputs' dtype. With u_k = J·v_k and (H u)_r =
        s_r·p_r ⊙ (u_r − ⟨p_r, u_r⟩), returns ((H u)·W (K, N, d), (H u)ᵀ·h (K, V, d), Σ_r (H u)_r (K, V),
        the last None without bias), in the inputs' dtype. Label smoothing does not enter it."""
        ...


PROTOCOLS: dict[str, type] = {OPTIMIZER: OptimizerStep, LOSS: LossKernels, LINEAR_LOSS: LinearLossKernels}


class HysteroGradState(NamedTuple):
    """One param group's HysteroGrad state as its step takes it (docs/hysterograd.md, "State and
    checkpoints"): ``metrics`` the metric G of each parameter; ``tau``, ``temp`` and ``energy`` the
    group scalars τ, T, E, 0-dim tensors of one dtype, float32 or float64 (torch's default dtype when
    they were created), on the parameters' device."""

    metrics: list[torch.Tensor]
    tau: torch.Tensor
    temp: torch.Tensor
    energy: torch.Tensor


class BiostatisState(NamedTuple):
    """One param group's BiostatisV6 state as its step takes it (docs/biostatis.md, "State and
    checkpoints"), one entry per parameter: ``exp_avgs`` and ``exp_avg_sqs`` (m, v), ``memory_emas``
    (a list of one EMA per memory decay), ``steps`` (0-dim float32 step counts, on the CPU or, for
    ``capturable=True``, on the parameters' device; the step increments them)."""

    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    memory_emas: list[list[torch.Tensor]]
    steps: list[torch.Tensor]


@dataclass(frozen=True)
class Sample:
    """One small call of a family's public API: ``family.api(*sample.args, fused=backend, **sample.kwargs)``.

    For an optimizer, ``args`` is ``(params,)``, each parameter with its ``.grad`` set: the call builds
    the optimizer, and each ``step()`` runs the kernels. For a loss, ``args`` is ``(logits, target)``
    with ``F.cross_entropy``'s shapes and the logits requiring grad; for a linear loss ``(hidden, weight,
    target)``, hidden and weight requiring grad. Either call returns the loss, differentiable twice in the
    arguments that require grad.
    """

    label: str
    args: tuple
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A kernel family: its name in the dispatch, its kind, the record its backends take, its page and
    its sample calls."""

    name: str  # the dispatch's key, e.g. "hysterograd"
    kind: str  # OPTIMIZER, LOSS or LINEAR_LOSS: which Protocol of PROTOCOLS its backends satisfy
    hyperparameters: type  # the record every backend receives (curvkern.hyperparameters)
    docs: str  # the page that defines its semantics, from the repository root
    public: str  # the dotted name of its public class or function, e.g. "curvkern.optim.HysteroGrad"
    sample_inputs: Callable[[torch.device, torch.dtype], tuple]  # fresh ``args`` for a Sample
    sample_hyperparameters: tuple[tuple[str, Mapping[str, Any]], ...]  # (label, kwargs), defaults first
    backends: tuple[str, ...] = BACKENDS  # the backends that implement it: each must register

    @property
    def protocol(self) -> type:
        return PROTOCOLS[self.kind]

    @property
    def api(self) -> Any:
        """The public class or function :attr:`public` names (imported on first use)."""
        module, _, attribute = self.public.rpartition(".")
        return getattr(importlib.import_module(module), attribute)

    def samples(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[Sample]:
        """One :class:`Sample` per entry of :attr:`sample_hyperparameters`, each on fresh, seeded inputs
        (the same values at every call) of ``dtype`` (the logits' or parameters') on ``device``."""
        device = torch.device(device)
        return [
            Sample(label, self.sample_inputs(device, dtype), dict(kwargs))
            for label, kwargs in self.sample_hyperparameters
        ]


def _parameters_with_gradients(device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor]]:
    """Three small parameters (a vector, a matrix, a vector), each with a seeded gradient."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in ((3,), (2, 2), (5,)):
        param = torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype).requires_grad_(True)
        param.grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype)
        params.append(param)
    return (params,)


def _logits_and_targets(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, d) = (3, 5, 2) logits, classes in dim 1 as ``F.cross_entropy`` takes them, requiring grad,
    and (3, 2) targets, one of them the default ignore index."""
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)).to(device, dtype).requires_grad_(True)
    target = torch.randint(0, 5, (3, 2), generator=generator).to(device)
    target[1, 0] = CrossEntropyHyperparameters.ignore_index
    return logits, target


def _hidden_weight_and_targets(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """hidden (3, 2, 4) and weight (5, 4), both requiring grad, and (3, 2) targets, one of them the default
    ignore index: what ``curvkern.linear_cross_entropy`` takes."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    weight = 1.5 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 2), generator=generator).to(device)
    target[1, 0] = CrossEntropyHyperparameters.ignore_index
    return hidden.to(device, dtype).requires_grad_(True), weight.to(device, dtype).requires_grad_(True), target


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="hysterograd",
            kind=OPTIMIZER,
            hyperparameters=HysteroGradHyperparameters,
            docs="docs/hysterograd.md",
            public="curvkern.optim.HysteroGrad",
            sample_inputs=_parameters_with_gradients,
            sample_hyperparameters=(
                ("defaults", {}),
                ("clipped", dict(lr=0.01, grad_clip=2.5, metric_scale=300.0, beta=0.9)),
                ("fixed barrier", dict(lr=1.0, stiffening_factor=1.0, initial_temp=0.0, adaptive_threshold=False)),
            ),
        ),
        Family(
            name="biostatis",
            kind=OPTIMIZER,
            hyperparameters=BiostatisHyperparameters,
            docs="docs/biostatis.md",
            public="curvkern.optim.BiostatisV6",
            sample_inputs=_parameters_with_gradients,
            sample_hyperparameters=(
                ("defaults", {}),
                ("no weight decay", dict(lr=3e-3, weight_decay=0.0, homeo_rate=0.5, energy_target=1e-4)),
                (
                    "three memories",
                    dict(memory_decays=(0.9, 0.99, 0.999), memory_weights=(0.5, 0.3, 0.2), flip_threshold=2.0),
                ),
                ("no memory", dict(memory_decays=(), memory_weights=())),
            ),
        ),
        Family(
            name="cross_entropy",
            kind=LOSS,
            hyperparameters=CrossEntropyLossHyperparameters,
            docs="docs/cross_entropy.md",
            public="curvkern.cross_entropy",
            sample_inputs=_logits_and_targets,
            sample_hyperparameters=(
                ("defaults", {}),
                ("smoothed sum", dict(reduction="sum", label_smoothing=0.1)),
                ("per element", dict(reduction="none")),
            ),
        ),
        Family(
            name="linear_cross_entropy",
            kind=LINEAR_LOSS,
            hyperparameters=CrossEntropyHyperparameters,
            docs="docs/linear_cross_entropy.md",
            public="curvkern.linear_cross_entropy",
            sample_inputs=_hidden_weight_and_targets,
            sample_hyperparameters=(
                ("defaults", {}),
                ("smoothed sum", dict(reduction="sum", label_smoothing=0.1)),
                ("per element", dict(reduction="none")),
            ),
        ),
    )
}


def get_family(name: str) -> Family:
    """The family called ``name``; ValueError, naming the known families, for any other name."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(f"unknown kernel family {name!r}; known families: {sorted(FAMILIES)}") from None


def families_of_kind(kind: str) -> list[Family]:
    """The families of ``kind`` (OPTIMIZER, LOSS or LINEAR_LOSS), in registry order; ValueError for another kind."""
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown kind of kernel family {kind!r}; expected one of {sorted(PROTOCOLS)}")
    return [family for family in FAMILIES.values() if family.kind == kind]
