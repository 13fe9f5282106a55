"""The cross-entropy benchmark cases: the loss-Hessian-vector product alone (``ce_hvp``), the whole
double backward through ``cross_entropy`` (loss, gradient with ``create_graph``, HVP), and the
hessian-eigenthings ``.hvp`` protocol on causal-LM logits, each against PyTorch's own path.

Baselines (``backend`` in a record):
- ``torch-eager``: PyTorch's ``F.cross_entropy`` double backward (loss, ``autograd.grad`` twice), the peer
  of ``ce-hvp`` and ``ce-double-backward``;
- ``torch-compile``: ``torch.compile`` of the closed-form eager HVP (for ``.hvp``, with the shifted copies
  and the zero-padded result: what hessian-eigenthings 1.0.0a6 falls back to), default sizes only
  (compiling takes tens of seconds);
- ``eigenthings-autograd``: hessian-eigenthings 1.0.0a5's own path for ``loss_of_output_fn`` (its
  ``hf_lm_loss_of_output`` and ``autograd.grad`` twice), the peer of ``ce-eigenthings-hvp``.

- ``calls``: K = 8 calls of ``ce_hvp`` with one tangent each, on the backend the ``ce-hvp-k8`` row names, the
  peer of ``ce-hvp-k8`` (one call with u of shape (8, N, V)).

``ce_hvp`` writes into a preallocated ``out=``; every other path allocates its results, as its API does.
Compulsory traffic, in copies of (N, V): ``ce-hvp`` and ``.hvp`` read z and u and write Hu (3); the double
backward also reads z for the loss and reads z / writes the gradient for the backward (6); K tangents read
z once and each u_k, and write each H u_k (1 + 2K: 17; K separate calls move 3K = 24).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import curvkern
from curvkern import available_backends
from curvkern.integrations import eigenthings as ck_eigenthings

FAMILY = "cross_entropy"
TANGENTS = 8  # the K of ce-hvp-k8
COPIES = {"ce-hvp": 3, "ce-double-backward": 6, "ce-eigenthings-hvp": 3, "ce-hvp-k8": 1 + 2 * TANGENTS}
PEER_BACKENDS = {
    "ce-hvp": "torch-eager",
    "ce-double-backward": "torch-eager",
    "ce-eigenthings-hvp": "eigenthings-autograd",
    "ce-hvp-k8": "calls",
}
IGNORED_FRACTION = 0.05  # labels set to -100, as padding does
SEQUENCES = 4  # causal-LM batches for .hvp: (SEQUENCES, N / SEQUENCES, V)

DEFAULT_WORKLOADS = {
    "cpu": (((1024, 50257), torch.float32),),
    "cuda": (((16384, 50304), torch.float32), ((16384, 50304), torch.bfloat16), ((8192, 128256), torch.bfloat16)),
}
QUICK_WORKLOADS = (((64, 1000), torch.float32),)


@dataclass(frozen=True)
class RowsShape:
    rows: int
    classes: int

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.classes}"


@dataclass(frozen=True)
class CrossEntropyKernel:
    name: str

    @property
    def peer_backend(self) -> str:
        return PEER_BACKENDS[self.name]


KERNELS = tuple(CrossEntropyKernel(name) for name in COPIES)


def _our_backends(device: torch.device) -> list[str]:
    # Triton on CPU tensors runs in its interpreter, a correctness tool: timing it says nothing.
    return [b for b in available_backends(FAMILY, device) if not (b == "triton" and device.type == "cpu")]


def _fastest(device: torch.device) -> str:
    """The compiled backend where there is one: K tangents are timed on it only (the eager reference's
    (K, N, V) temporaries would take minutes and gigabytes)."""
    ours = _our_backends(device)
    return next((b for b in ("triton", "cpp") if b in ours), ours[0])


def _backends(kernel: CrossEntropyKernel, device: torch.device, quick: bool) -> list[str]:
    if kernel.name == "ce-hvp-k8":
        return ["calls", _fastest(device)]
    ours = _our_backends(device)
    compiled = ["torch-compile"] if kernel.name != "ce-double-backward" and not quick else []
    return [kernel.peer_backend, *compiled, *ours]


def eager_closed_form_hvp(z: torch.Tensor, y: torch.Tensor, u: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The loss-Hessian-vector product in plain PyTorch (mean reduction), what ``torch-compile`` compiles."""
    zf, uf = z.float(), u.float()
    valid = y != ignore_index
    p = torch.softmax(zf, dim=-1)
    hvp = p * (uf - (p * uf).sum(-1, keepdim=True)) / valid.sum()
    return torch.where(valid[..., None], hvp, 0.0).to(z.dtype)


def eigenthings_fallback_hvp(output: torch.Tensor, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """hessian-eigenthings 1.0.0a6's fallback for a causal LM's ``.hvp``: shifted copies, the closed form,
    the result copied into a zero (B, T, V) tensor."""
    shifted = eager_closed_form_hvp(output[:, :-1].contiguous(), labels[:, 1:], u[:, :-1].contiguous())
    full = torch.zeros_like(output)
    full[:, :-1] = shifted
    return full


def _double_backward(loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    leaf = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf, create_graph=True)
    return torch.autograd.grad(grad, leaf, u)[0]


@dataclass(frozen=True)
class CrossEntropyCase:
    kernel: CrossEntropyKernel
    backend: str
    shape: RowsShape
    dtype: torch.dtype
    device: torch.device
    suite = "cross_entropy"

    @property
    def name(self) -> str:
        return f"{self.kernel.name}/{self.backend}/{self.shape.label}/{str(self.dtype).removeprefix('torch.')}"

    @property
    def workload(self) -> str:
        return f"{self.kernel.name}/{self.shape.label}/{str(self.dtype).removeprefix('torch.')}/{self.device.type}"

    @property
    def copy_bytes(self) -> int:
        """One copy of (N, V) in the logits' dtype."""
        return self.shape.rows * self.shape.classes * self.dtype.itemsize

    @property
    def compulsory_bytes(self) -> int:
        return COPIES[self.kernel.name] * self.copy_bytes

    def describe(self) -> dict:
        return {
            "kernel": self.kernel.name,
            "backend": self.backend,
            "shape": self.shape.label,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            "bytes": self.compulsory_bytes,
        }

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, labels (a few ignored) and the tangent u ((K, N, V) for ``ce-hvp-k8``)."""
        generator = torch.Generator(self.device).manual_seed(0)
        n, v = self.shape.rows, self.shape.classes
        logits = (3 * torch.randn(n, v, generator=generator, device=self.device)).to(self.dtype)
        target = torch.randint(0, v, (n,), generator=generator, device=self.device)
        ignored = torch.rand(n, generator=generator, device=self.device) < IGNORED_FRACTION
        target = torch.where(ignored, -100, target)
        tangents = (TANGENTS,) if self.kernel.name == "ce-hvp-k8" else ()
        u = torch.randn(*tangents, n, v, generator=generator, device=self.device).to(self.dtype)
        return logits, target, u

    @property
    def input_bytes(self) -> int:
        """Logits and u (the labels are negligible): what "peak with the inputs" adds."""
        return (1 + (TANGENTS if self.kernel.name == "ce-hvp-k8" else 1)) * self.copy_bytes

    def setup(self, warmup_calls: int = 1) -> Callable[[], object]:
        """The inputs and the call to time, warmed up (compiled, autotuned, JIT-built)."""
        call = self._make_call(*self.inputs())
        for _ in range(warmup_calls):
            call()
        return call

    def _make_call(self, logits, target, u) -> Callable[[], object]:
        name, backend = self.kernel.name, self.backend
        if name == "ce-eigenthings-hvp":
            return self._eigenthings_call(logits, target, u)
        if name == "ce-hvp-k8":
            out = torch.empty_like(u)
            if backend == "calls":
                fused = _fastest(self.device)
                return lambda: [curvkern.ce_hvp(logits, target, u_k, out=o_k, fused=fused) for u_k, o_k in zip(u, out)]
            return lambda: curvkern.ce_hvp(logits, target, u, out=out, fused=backend)
        if backend == "torch-eager":
            return lambda: _double_backward(lambda z: F.cross_entropy(z, target), logits, u)
        if backend == "torch-compile":
            compiled = torch.compile(eager_closed_form_hvp)
            return lambda: compiled(logits, target, u)
        if name == "ce-hvp":
            out = torch.empty_like(logits)
            return lambda: curvkern.ce_hvp(logits, target, u, out=out, fused=backend)
        return lambda: _double_backward(lambda z: curvkern.cross_entropy(z, target, fused=backend), logits, u)

    def _eigenthings_call(self, logits, target, u) -> Callable[[], object]:
        sequences = SEQUENCES if self.shape.rows % SEQUENCES == 0 else 1
        output = logits.view(sequences, -1, self.shape.classes)
        tangent = u.view_as(output)
        batch = {"labels": target.view(sequences, -1)}
        if self.backend == "eigenthings-autograd":
            from hessian_eigenthings import hf_lm_loss_of_output

            loss_of_output = hf_lm_loss_of_output()
            return lambda: _double_backward(lambda z: loss_of_output(z, batch), output, tangent)
        if self.backend == "torch-compile":
            compiled = torch.compile(eigenthings_fallback_hvp)
            return lambda: compiled(output, batch["labels"], tangent)
        loss_of_output = ck_eigenthings.hf_lm_loss_of_output(fused=self.backend)
        return lambda: loss_of_output.hvp(output, batch, tangent)


def build_cross_entropy_cases(device: torch.device, quick: bool = False) -> list[CrossEntropyCase]:
    workloads = QUICK_WORKLOADS if quick else DEFAULT_WORKLOADS[device.type]
    # The .hvp rows need hessian-eigenthings itself for their baseline.
    kernels = [k for k in KERNELS if k.name != "ce-eigenthings-hvp" or importlib.util.find_spec("hessian_eigenthings")]
    return [
        CrossEntropyCase(kernel, backend, RowsShape(*shape), dtype, device)
        for shape, dtype in workloads
        for kernel in kernels
        for backend in _backends(kernel, device, quick)
    ]
