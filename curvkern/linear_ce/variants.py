"""The loss variants of ``linear_cross_entropy`` and ``linear_ce_ggn_vp`` (docs/linear_cross_entropy.md, "Loss
variants"): their hyperparameter record, its checks, and the refusal of a backend that lacks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from curvkern.hyperparameters import CrossEntropyHyperparameters, require_range

# Which variants each backend implements; a backend not listed implements none.
IMPLEMENTED = {
    "eager": frozenset({"z_loss", "softcap", "class_weight"}),
    "cpp": frozenset({"z_loss", "softcap", "class_weight"}),
    "triton": frozenset({"z_loss", "softcap", "class_weight"}),
}


@dataclass(frozen=True)
class LinearCrossEntropyHyperparameters(CrossEntropyHyperparameters):
    """:class:`CrossEntropyHyperparameters` and the loss variants LM training uses, as the linear kernels read
    them (all defaults: the plain loss).

    - ``z_loss`` λ ≥ 0: λ·lse(z')² added to each valid row's loss (PaLM), reduced with it.
    - ``softcap`` c > 0 or None: the logits the loss sees are z' = c·tanh(z/c) (Gemma 2).
    - ``class_weight``: None or a (V,) floating tensor of finite non-negative class weights, as
      ``F.cross_entropy``'s ``weight``. Compared by identity (a tensor has no truth value).

    Building the record checks ``z_loss`` and ``softcap``; :meth:`check_class_weight` checks the tensor.
    """

    z_loss: float = 0.0
    softcap: float | None = None
    class_weight: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "z_loss", require_range("z_loss", self.z_loss, 0.0))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", require_range("softcap", self.softcap, 0.0, low_open=True))

    def variants(self) -> tuple[str, ...]:
        """The names of the non-default variants, in a fixed order."""
        names = ("z_loss",) if self.z_loss else ()
        names += ("softcap",) if self.softcap is not None else ()
        return names + (("class_weight",) if self.class_weight is not None else ())

    def check_class_weight(self, num_classes: int, device: torch.device) -> None:
        """``class_weight`` must be None or a (V,) floating tensor on ``device``, finite and ≥ 0 (those two
        checked on CPU tensors only: on a GPU the check would cost a host sync). Raises ValueError naming it."""
        weight = self.class_weight
        if weight is None:
            return
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"Invalid class_weight: expected a ({num_classes},) tensor or None, got {type(weight)}")
        if weight.shape != (num_classes,) or not weight.is_floating_point() or weight.device != device:
            raise ValueError(
                f"Invalid class_weight: expected a floating ({num_classes},) tensor (one weight per class) on "
                f"{device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
            )
        if weight.device.type == "cpu" and not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise ValueError("Invalid class_weight: expected finite, non-negative class weights")


def missing_variants(hyperparameters: CrossEntropyHyperparameters, backend: str) -> list[str]:
    """The loss variants a call asks for that ``backend`` does not implement."""
    variants = hyperparameters.variants() if isinstance(hyperparameters, LinearCrossEntropyHyperparameters) else ()
    return [name for name in variants if name not in IMPLEMENTED.get(backend, frozenset())]


def refuse_missing_variants(hyperparameters: CrossEntropyHyperparameters, backend: str) -> None:
    """Raise NotImplementedError naming the variants ``backend`` lacks and the backend; never a silent plain loss."""
    missing = missing_variants(hyperparameters, backend)
    if missing:
        raise NotImplementedError(
            f"curvkern.linear_cross_entropy: fused={backend!r} does not implement the loss variant(s) "
            f"{', '.join(missing)} yet; pass fused='eager' or 'auto' (the reference implements every variant)"
        )
