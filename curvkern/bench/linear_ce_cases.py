"""The fused linear + cross-entropy benchmark cases (docs/linear_cross_entropy.md): the loss of a language
model's output layer, ``hidden @ weight.T``, with its gradient and one exact Hessian-vector product, and its
Gauss-Newton product, each through ``curvkern.linear_cross_entropy`` / ``curvkern.linear_ce_ggn_vp``,
against paths that materialise the (N, V) logits.

Kernels (``kernel`` in a record), all fp32, ``mean`` reduction, 5% of the rows ignored:

- ``lce-hvp``: loss, gradient to (hidden, weight) with ``create_graph``, and the double backward with
  tangents (v_hidden, v_weight): the exact HVP, cross terms included;
- ``lce-ggn-vp``: one Gauss-Newton product of the head with tangents (d_hidden, d_weight);
- ``lce-ggn-vp-k8``: K = 8 tangents d_hidden (K, N, d) in one call against K separate calls.

Baselines (``backend`` in a record):

- ``torch-eager``: ``F.linear`` + ``F.cross_entropy`` and autograd's double backward, the peer of ``lce-hvp``;
- ``materialised``: the logits ``hidden @ weight.T`` materialised, then curvkern's own cross-entropy kernels:
  ``curvkern.cross_entropy`` and its double backward for ``lce-hvp``, ``curvkern.ce_hvp`` between the two
  products of the GGN for ``lce-ggn-vp`` (its peer);
- ``calls``: K calls of ``linear_ce_ggn_vp`` with one tangent each, on the backend the ``lce-ggn-vp-k8``
  row names, the peer of ``lce-ggn-vp-k8``.

The materialised paths run only where their (N, V) tensors fit (:data:`MATERIALISED_LIMIT_BYTES`): at
(4096, 128, 262144) one fp32 copy of the logits is 4 GiB and PyTorch's double backward needs seven.
There only the compiled backend runs (one call takes tens of seconds on a CPU).

Work per call in GEMM passes of 2·N·d·V FLOPs each (:func:`gemm_passes`; the softmax's N·V exps and the
row sums are negligible next to them on a CPU): the fused double backward recomputes the logits and their
tangent in each of its two sweeps, which is what it pays for never storing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import curvkern
from curvkern import available_backends

FAMILY = "linear_cross_entropy"
HVP, GGN, GGN_TANGENTS = "lce-hvp", "lce-ggn-vp", "lce-ggn-vp-k8"
TANGENTS = 8  # the K of lce-ggn-vp-k8
PEER_BACKENDS = {HVP: "torch-eager", GGN: "materialised", GGN_TANGENTS: "calls"}
IGNORED_FRACTION = 0.05  # labels set to -100, as padding does
# The materialised paths need several (N, V) fp32 tensors at once: the 24 GiB GPU, and about this
# machine's memory. MATERIALISED_COPIES is PyTorch's double backward's peak beyond its inputs and results at
# (2048, 768, 50257), in (N, V) fp32 copies, measured (docs/benchmarks.md, "Linear + cross-entropy"): 7.0.
MATERIALISED_LIMIT_BYTES = 24 * 2**30
MATERIALISED_COPIES = 7


@dataclass(frozen=True)
class HeadShape:
    """N rows (tokens), d features, V classes."""

    rows: int
    features: int
    classes: int

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.features}x{self.classes}"

    @property
    def logits_copy_bytes(self) -> int:
        """One (N, V) fp32 copy of the logits: what the peak memory is compared with."""
        return self.rows * self.classes * 4

    @property
    def gemm_flops(self) -> int:
        """One GEMM pass over the logits: 2·N·d·V."""
        return 2 * self.rows * self.features * self.classes

    def materialised_fits(self) -> bool:
        return MATERIALISED_COPIES * self.logits_copy_bytes < MATERIALISED_LIMIT_BYTES


DEFAULT_WORKLOADS = (
    (HVP, HeadShape(2048, 768, 50257)),
    (HVP, HeadShape(4096, 128, 262144)),
    (GGN, HeadShape(4096, 128, 262144)),
    (GGN_TANGENTS, HeadShape(1024, 768, 50257)),
)
QUICK_WORKLOADS = (
    (HVP, HeadShape(64, 32, 1000)),
    (HVP, HeadShape(128, 16, 4000)),
    (GGN, HeadShape(128, 16, 4000)),
    (GGN_TANGENTS, HeadShape(32, 32, 1000)),
)


def gemm_passes(kernel: str, backend: str) -> int:
    """GEMM passes of 2·N·d·V FLOPs one call makes (docs/benchmarks.md, "Linear + cross-entropy").

    - ``lce-hvp`` fused: forward z (1); backward z, g_z·W, g_zᵀ·h (3); double backward, sweep 1: z, u =
      v_h·Wᵀ + h·v_Wᵀ (3), sweep 2: z, u, (H_z u)·W, g_z·v_W, (H_z u)ᵀ·h, g_zᵀ·v_h (7): 14. Materialised
      (and PyTorch): z (1); g_z·W, g_zᵀ·h (2); u (2) and the four products (4): 9, the minimum.
    - ``lce-ggn-vp`` fused: sweep 1 z, u (3), sweep 2 z, u and two products (5): 8; materialised: 5.
    - ``lce-ggn-vp-k8`` with d_hidden only: one call with K tangents computes each z tile once per sweep,
      u_k twice and two products per tangent: 2 + 4K (34); K calls: 6K (48).
    """
    materialised = backend in ("materialised", "torch-eager")
    if kernel == HVP:
        return 9 if materialised else 14
    if kernel == GGN:
        return 5 if materialised else 8
    return 6 * TANGENTS if backend == "calls" else 2 + 4 * TANGENTS


def _our_backends(device: torch.device) -> list[str]:
    # Triton on CPU tensors runs in its interpreter, a correctness tool: timing it says nothing.
    return [b for b in available_backends(FAMILY, device) if not (b == "triton" and device.type == "cpu")]


def _backends(kernel: str, shape: HeadShape, device: torch.device) -> list[str]:
    ours = _our_backends(device)
    if kernel == GGN_TANGENTS:
        return ["calls", _fastest(ours)]
    baselines = {HVP: ["torch-eager", "materialised"], GGN: ["materialised"]}[kernel]
    if not shape.materialised_fits():
        # Nothing to compare with but the kernel itself: one call takes tens of seconds on a CPU here, so
        # the eager reference (the same GEMMs) is left out.
        return [_fastest(ours)]
    return [*baselines, *ours]


def _fastest(backends: list[str]) -> str:
    """The compiled backend where there is one (C++ on CPU), else the eager reference."""
    return next((b for b in backends if b != "eager"), "eager")


@dataclass(frozen=True)
class LinearCrossEntropyKernel:
    name: str

    @property
    def peer_backend(self) -> str:
        return PEER_BACKENDS[self.name]


def _double_backward(loss_fn, hidden, weight, tangents):
    """Loss, gradient to (hidden, weight) with ``create_graph``, then the HVP with ``tangents``."""
    hidden, weight = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss = loss_fn(hidden, weight)
    grads = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    hvp = torch.autograd.grad(grads, (hidden, weight), tangents)
    return loss.detach(), *(g.detach() for g in grads), *hvp


def materialised_ggn_vp(hidden, weight, target, d_hidden, d_weight):
    """The GGN product with the logits and their tangent materialised, and curvkern's ``ce_hvp`` between."""
    with torch.no_grad():
        logits = hidden @ weight.T
        u = torch.addmm(d_hidden @ weight.T, hidden, d_weight.T)
        hu = curvkern.ce_hvp(logits, target, u)
        del logits, u
        return hu @ weight, hu.T @ hidden


@dataclass(frozen=True)
class LinearCrossEntropyCase:
    kernel: LinearCrossEntropyKernel
    backend: str
    shape: HeadShape
    device: torch.device
    dtype = torch.float32
    suite = "linear_cross_entropy"

    @property
    def name(self) -> str:
        return f"{self.kernel.name}/{self.backend}/{self.shape.label}/float32"

    @property
    def workload(self) -> str:
        return f"{self.kernel.name}/{self.shape.label}/float32/{self.device.type}"

    @property
    def _tangent_sets(self) -> int:
        """Copies of (hidden, weight)-shaped tangents among the inputs."""
        return TANGENTS if self.kernel.name == GGN_TANGENTS else 1

    @property
    def input_bytes(self) -> int:
        """hidden, weight and the tangents (the labels are negligible)."""
        n, d, v = self.shape.rows, self.shape.features, self.shape.classes
        tangent_bytes = n * d * 4 * self._tangent_sets if self.kernel.name == GGN_TANGENTS else (n + v) * d * 4
        return (n + v) * d * 4 + tangent_bytes

    @property
    def output_bytes(self) -> int:
        """The results: gradient and HVP to (hidden, weight) for lce-hvp, the products otherwise."""
        n, d, v = self.shape.rows, self.shape.features, self.shape.classes
        per_set = (n + v) * d * 4
        return {HVP: 2 * per_set, GGN: per_set, GGN_TANGENTS: TANGENTS * per_set}[self.kernel.name]

    @property
    def compulsory_bytes(self) -> int:
        """Read the inputs, write the results: the fused kernels never move (N, V) tensors."""
        return self.input_bytes + self.output_bytes

    @property
    def flops(self) -> int:
        return gemm_passes(self.kernel.name, self.backend) * self.shape.gemm_flops

    def describe(self) -> dict:
        return {
            "kernel": self.kernel.name,
            "backend": self.backend,
            "shape": self.shape.label,
            "dtype": "float32",
            "device": self.device.type,
            "bytes": self.compulsory_bytes,
            "flops": self.flops,
            "output_bytes": self.output_bytes,
        }

    def inputs(self) -> dict[str, torch.Tensor]:
        """hidden (N, d) ~ N(0, 1), weight (V, d) ~ N(0, 1/d) (logits of unit scale), labels with a few
        ignored, and the tangents: (v_hidden, v_weight) of the same scales, or K d_hidden for K tangents."""
        generator = torch.Generator(self.device).manual_seed(0)
        n, d, v = self.shape.rows, self.shape.features, self.shape.classes

        def randn(*size, scale=1.0):
            return scale * torch.randn(*size, generator=generator, device=self.device)

        target = torch.randint(0, v, (n,), generator=generator, device=self.device)
        ignored = torch.rand(n, generator=generator, device=self.device) < IGNORED_FRACTION
        tensors = {
            "hidden": randn(n, d),
            "weight": randn(v, d, scale=d**-0.5),
            "target": torch.where(ignored, -100, target),
        }
        if self.kernel.name == GGN_TANGENTS:
            tensors["d_hidden"] = randn(TANGENTS, n, d)
        else:
            tensors["v_hidden"], tensors["v_weight"] = randn(n, d), randn(v, d, scale=d**-0.5)
        return tensors

    def setup(self, warmup_calls: int = 0) -> Callable[[], object]:
        """The inputs and the call to time, after ``warmup_calls`` calls: none by default, as one call takes
        seconds at the default sizes and the timers' :func:`~curvkern.bench.timing.plan_repeats` makes a
        warm-up call anyway. The call returns its results (for the peak memory)."""
        call = self._make_call(**self.inputs())
        for _ in range(warmup_calls):
            call()
        return call

    def _make_call(self, hidden, weight, target, v_hidden=None, v_weight=None, d_hidden=None):
        name, backend = self.kernel.name, self.backend
        if name == GGN_TANGENTS:
            fused = _fastest(_our_backends(self.device))
            if backend == "calls":
                return lambda: [curvkern.linear_ce_ggn_vp(hidden, weight, target, d, fused=fused) for d in d_hidden]
            return lambda: curvkern.linear_ce_ggn_vp(hidden, weight, target, d_hidden, fused=backend)
        if name == GGN:
            if backend == "materialised":
                return lambda: materialised_ggn_vp(hidden, weight, target, v_hidden, v_weight)
            return lambda: curvkern.linear_ce_ggn_vp(hidden, weight, target, v_hidden, v_weight, fused=backend)
        if backend == "torch-eager":
            loss_fn = lambda h, w: F.cross_entropy(F.linear(h, w), target)  # noqa: E731
        elif backend == "materialised":
            loss_fn = lambda h, w: curvkern.cross_entropy(h @ w.T, target)  # noqa: E731
        else:
            loss_fn = lambda h, w: curvkern.linear_cross_entropy(h, w, target, fused=backend)  # noqa: E731
        return lambda: _double_backward(loss_fn, hidden, weight, (v_hidden, v_weight))


KERNELS = tuple(LinearCrossEntropyKernel(name) for name in PEER_BACKENDS)


def build_linear_cross_entropy_cases(device: torch.device, quick: bool = False) -> list[LinearCrossEntropyCase]:
    """Each workload's baselines (where they fit), then curvkern's backends."""
    by_name = {kernel.name: kernel for kernel in KERNELS}
    return [
        LinearCrossEntropyCase(by_name[name], backend, shape, device)
        for name, shape in (QUICK_WORKLOADS if quick else DEFAULT_WORKLOADS)
        for backend in _backends(name, shape, device)
    ]
