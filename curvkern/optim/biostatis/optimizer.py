"""BiostatisV6: hyperparameters, state, grouping, then one backend call per group."""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist

from curvkern._dispatch import select
from curvkern.families import BiostatisState
from curvkern.hyperparameters import BiostatisHyperparameters
from curvkern.optim._common import (
    FusedOptimizer,
    GroupLayout,
    check_like,
    check_state_keys,
    parameter_name,
    pick,
    state_dtype,
)
from curvkern.optim._distributed import state_like

_NAME = "BiostatisV6"
_DEFAULTS = BiostatisHyperparameters()
STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "memory_emas"})


class BiostatisV6(FusedOptimizer):
    """Adam with homeostatic gains, multi-scale gradient EMAs, a polarity term and "selective ascent".

    Semantics of ``BiostatisV6`` from github Hindolch/V6-optimizer (``docs/biostatis.md``),
    quirks included: the asymmetric polarity ``g·(1 + 0.5·sign(g)·τ)``, the "ascent" that adds
    descent, the importance test on un-bias-corrected ``m, v`` with ``mean(√v)``, the fp32 rounding
    of ``tanh(C − c*)``, count-weighted group means, per-tensor step counts, and decoupled weight
    decay applied before the update is added. Group gains are computed per param group, so how the
    parameters are grouped changes the update.

    ``fused`` picks the backend: ``"eager"``, ``"cpp"``, ``"triton"`` or ``"auto"`` (see
    :mod:`curvkern._dispatch`). It is not saved in ``state_dict()``, so a checkpoint loads under
    every mode. The step never reads a tensor back to the host.

    State per parameter (created on its first step with a gradient): ``step`` (a 0-dim float32
    CPU tensor, as torch.optim keeps it; the original's int steps load too), ``exp_avg``,
    ``exp_avg_sq`` and ``memory_emas`` (a list, one tensor per memory decay).

    ``capturable=True`` (torch.optim's name, as in ``Adam``) keeps ``step`` on the parameter's device
    instead, so a whole ``step()`` can be captured in a CUDA graph. Like ``fused``, it is an attribute,
    not saved in ``state_dict()``: a checkpoint loads in either mode, ``step`` moved where it belongs.
    ``lr`` may be a 1-element tensor, as in torch.optim: it acts as the float it holds, and a scheduler
    that updates it in place changes the lr a captured graph replays.

    Under ``torch.compile`` (torch's recipe: a compiled function that calls ``step()``) the step traces
    without a graph break on every backend. Capturing ``step()`` in a CUDA graph with ``capturable=False``
    raises RuntimeError, as torch.optim's optimizers do.

    Schedulers: every torch LR scheduler works. ``OneCycleLR`` and ``CyclicLR`` cycle ``betas[0]`` by
    default (``cycle_momentum=True``), as they do Adam's: β1 is then the scheduler's momentum (OneCycleLR
    starts it at ``max_momentum=0.95``, not at the constructor's 0.9); ``cycle_momentum=False`` keeps it.
    Under torch.compile each new float (lr, a cycled β1) recompiles the step: give a tensor lr and
    ``cycle_momentum=False`` there (docs/biostatis.md, "torch.compile, CUDA graphs and LR schedulers").

    Deliberate deviations from the original:

    - hyperparameters are validated, and ``memory_decays`` and ``memory_weights`` must have the
      same length (the original's ``zip`` silently truncates);
    - bf16/fp16 parameters keep their state in fp32 and do all their math in fp32, the result
      written back rounded to nearest even (the original's bf16 state loses small updates and its
      fp16 state gives inf/NaN from the first step);
    - the scalars (cosine, importance, gains, coefficients) are computed on the device in float64
      from per-tensor sums accumulated in the state dtype, not on the host from the original's
      means (ulp-level differences in fp32; the importance test ``I < θ`` can flip only for an
      ``I`` within rounding of θ);
    - non-contiguous gradients work (the original's ``.view(-1)`` raises); sparse gradients,
      complex parameters and a group spread over several devices raise;
    - empty parameters get state and step counts like any other but add nothing to the group
      sums or element count, and are not updated.

    ``process_group`` (default None): a ``torch.distributed.ProcessGroup`` over which the group energy and
    coherence (the column sums Σg², Σ|tanh g|, … and the element count) are summed when each rank steps
    whole tensors, as under ``ZeroRedundancyOptimizer`` (give it through ``functools.partial``); the
    per-tensor statistics stay local. The step then equals one process's. None, right under DDP, never
    communicates. Like ``fused`` it is not in ``state_dict()``. Build after ``init_process_group``, where
    ``dist.group.WORLD`` stops being None. Raises TypeError (not a group), RuntimeError (default group
    destroyed), ValueError (with ``capturable=True``); see docs/distributed.md.

    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, hybrid meshes) step as their local shards,
    every statistic summed over the mesh dimensions each tensor is sharded on (one ``all_gather`` per group
    and step), so the result is one process's; their state is DTensor, for torch.distributed.checkpoint.
    A group that mixes DTensors and plain tensors raises TypeError (docs/distributed.md).

    Checks: tensor subclasses other than DTensor raise TypeError
    at construction; ``step()`` raises RuntimeError, naming the group, parameter and state key, before
    any group moves, if a gradient or state tensor does not match its parameter (shape, dtype, device,
    dense layout), a step count is not a 0-dim float32 tensor where the mode keeps it, or a state
    entry lacks a key; ``load_state_dict`` checks the same, validates the hyperparameters as the
    constructor does (one the checkpoint lacks takes the default) and leaves the optimizer as it was
    when it raises.
    """

    family = "biostatis"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = _DEFAULTS.lr,
        betas: tuple[float, float] = _DEFAULTS.betas,
        eps: float = _DEFAULTS.eps,
        weight_decay: float = _DEFAULTS.weight_decay,
        homeo_rate: float = _DEFAULTS.homeo_rate,
        coherence_target: float = _DEFAULTS.coherence_target,
        energy_target: float = _DEFAULTS.energy_target,
        lambda_energy: float = _DEFAULTS.lambda_energy,
        memory_decays: tuple[float, ...] = _DEFAULTS.memory_decays,
        memory_weights: tuple[float, ...] = _DEFAULTS.memory_weights,
        flip_threshold: float = _DEFAULTS.flip_threshold,
        ascent_strength: float = _DEFAULTS.ascent_strength,
        *,
        fused: str = "auto",
        capturable: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.capturable = capturable
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            homeo_rate=homeo_rate,
            coherence_target=coherence_target,
            energy_target=energy_target,
            lambda_energy=lambda_energy,
            memory_decays=memory_decays,
            memory_weights=memory_weights,
            flip_threshold=flip_threshold,
            ascent_strength=ascent_strength,
        )
        super().__init__(params, defaults, fused, process_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every param group that has a gradient; returns the closure's loss (None without one).

        Raises RuntimeError if a CUDA graph captures a step with ``capturable=False``, or if a gradient or
        state tensor does not match its parameter (before any group moves).
        """
        self._refuse_capture_unless_capturable()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._check_step_inputs()  # every group, before the first one moves
        for group, steps_now in zip(self.param_groups, self._groups_that_step(), strict=True):
            if not steps_now:
                continue  # as the original: no decay, no state, no step counts
            params, grads = [], []
            for param in group["params"]:
                grad = param.grad
                if grad is not None:
                    params.append(param)
                    grads.append(grad)
            device = self._group_device(group)

            n_memories = len(group["memory_decays"])
            exp_avgs, exp_avg_sqs, memory_emas, state_steps = [], [], [], []
            for param in params:
                state = self.state[param]
                if not state:
                    zeros = functools.partial(
                        torch.zeros_like, param, dtype=state_dtype(param), memory_format=torch.preserve_format
                    )
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(param))
                    state["exp_avg"] = zeros()
                    state["exp_avg_sq"] = zeros()
                    state["memory_emas"] = [zeros() for _ in range(n_memories)]
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                memory_emas.append(state["memory_emas"])
                state_steps.append(state["step"])

            _, step_fn = select(self.family, self.fused, device)
            state = BiostatisState(exp_avgs, exp_avg_sqs, memory_emas, state_steps)
            self._run_step(step_fn, params, grads, state, BiostatisHyperparameters.from_group(group, device))
        return loss

    def _step_device(self, param: torch.Tensor) -> torch.device:
        return param.device if self.capturable else torch.device("cpu")

    def _restore_entry(self, param: torch.Tensor, key: str, value):
        if key == "step":
            # The original keeps a Python int.
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return value.detach().to(device=self._step_device(param), dtype=torch.float32, copy=True).reshape(())
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return torch.tensor(float(value), dtype=torch.float32, device=self._step_device(param))
        elif key in ("exp_avg", "exp_avg_sq") and isinstance(value, torch.Tensor):
            return state_like(param, value, state_dtype(param))
        elif key == "memory_emas" and isinstance(value, (list, tuple)):
            dtype = state_dtype(param)
            return [state_like(param, ema, dtype) if isinstance(ema, torch.Tensor) else ema for ema in value]
        return copy.deepcopy(value)  # _check_group_state names what it should be

    def _check_group_state(self, group_index: int, group: dict, state, layout: GroupLayout) -> None:
        """Wherever a parameter has state: all four keys; ``step`` a 0-dim float32 tensor on
        :meth:`_step_device`; ``exp_avg``, ``exp_avg_sq`` and one memory EMA per memory decay (a list)
        like the parameter, in the state dtype."""
        params = group["params"]
        entries = list(map(state.get, params))
        indices = [i for i, entry in enumerate(entries) if entry]
        if not indices:
            return
        if len(indices) != len(entries):
            entries = [entries[i] for i in indices]
        check_state_keys(_NAME, group_index, indices, entries, STATE_KEYS, STATE_KEYS)
        n = len(indices)
        step_device = self._step_device(params[0])  # the group shares one device
        check_like(
            _NAME,
            "state 'step'",
            group_index,
            indices,
            [entry["step"] for entry in entries],
            None,
            [torch.float32] * n,
            step_device,
        )
        like, dtypes = pick(params, indices), pick(layout.state_dtypes, indices)
        for key in ("exp_avg", "exp_avg_sq"):
            check_like(
                _NAME,
                f"state '{key}'",
                group_index,
                indices,
                [entry[key] for entry in entries],
                like,
                dtypes,
                layout.device,
            )
        n_memories = len(group["memory_decays"])
        all_emas = [entry["memory_emas"] for entry in entries]
        for index, emas in zip(indices, all_emas):
            if type(emas) is not list or len(emas) != n_memories:
                raise RuntimeError(
                    f"{_NAME}: state 'memory_emas' of {parameter_name(group_index, index)} must be a list of one "
                    f"tensor per memory decay ({n_memories}), got a {type(emas).__name__}"
                    + (f" of {len(emas)}" if isinstance(emas, (list, tuple)) else "")
                )
        for j in range(n_memories):
            check_like(
                _NAME,
                f"state 'memory_emas'[{j}]",
                group_index,
                indices,
                [emas[j] for emas in all_emas],
                like,
                dtypes,
                layout.device,
            )
