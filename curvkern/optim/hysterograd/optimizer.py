"""HysteroGrad (HIOptimizer): hyperparameters, state, grouping, then one backend call per group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from curvkern._dispatch import select
from curvkern.families import HysteroGradState
from curvkern.hyperparameters import HysteroGradHyperparameters, require_range
from curvkern.optim._common import FusedOptimizer, GroupLayout, check_like, check_state_keys, pick, state_dtype
from curvkern.optim._distributed import state_like

_NAME = "HysteroGrad"
_DEFAULTS = HysteroGradHyperparameters()
_GROUP_SCALAR_ORDER = ("group_tau", "group_temp", "avg_energy")
_GROUP_SCALARS = frozenset(_GROUP_SCALAR_ORDER)
_G = frozenset({"G"})
_FIRST_KEYS = _G | _GROUP_SCALARS
_SCALAR_DTYPES = (torch.float32, torch.float64)  # what the C++ scalar stage takes


class HysteroGrad(FusedOptimizer):
    """Fisher-EMA preconditioned steps behind a hysteresis gate per parameter group.

    Semantics of ``HIOptimizer`` from github dingste/HysteroGrad (``docs/hysterograd.md``):
    RMSprop-style ``u = g / (√G + ε)`` with ``G`` an EMA of ``metric_scale·g²``; a group moves,
    ``p ← p − lr·k·u``, only when its (optionally clipped) norm ``N̂ = k·‖u‖`` exceeds the barrier
    ``h = κ·√τ·(1 − clamp(T, 0, 1))·hs·(E + 1e-8)``, while τ, T, E and G advance on every step.

    ``step()`` returns ``(status, g_norm, h_width)`` like the original: ``"Liquid"`` if any group
    moved, and the means of N̂ and h over all groups. That tuple needs one small device-to-host
    read per step; nothing else in the step leaves the device. The closure's loss, which the
    original drops, is kept in ``last_loss``.

    ``capturable=True`` (torch.optim's name for it) skips that read, so a whole ``step()`` can be
    captured in a CUDA graph: it returns ``(liquid, g_norm, h_width)`` as 0-dim tensors on the
    parameters' device (``liquid`` a bool tensor), the same values the tuple holds. Like ``fused``,
    it is an attribute of the optimizer, not saved in ``state_dict()``. ``lr`` may be a 1-element
    tensor, as in torch.optim: it acts as the float it holds, and a scheduler that updates it in place
    changes the lr a captured graph replays.

    Under ``torch.compile`` (torch's recipe: a compiled function that calls ``step()``) the step traces
    without a graph break on every backend, and returns the ``capturable`` form whatever ``capturable``
    is: reading the tuple back would end the graph. Capturing ``step()`` in a CUDA graph with
    ``capturable=False`` raises RuntimeError, as torch.optim's optimizers do.

    Schedulers: every torch LR scheduler works. HysteroGrad has no momentum or betas to cycle:
    ``OneCycleLR`` and ``CyclicLR``, which cycle one by default, raise ValueError ("optimizer must support
    momentum or beta1 ...") unless given ``cycle_momentum=False``. Under torch.compile each new float lr
    recompiles the step: give a tensor lr there (docs/hysterograd.md, "torch.compile, CUDA graphs and LR
    schedulers").

    ``fused`` picks the backend: ``"eager"``, ``"cpp"``, ``"triton"`` or ``"auto"`` (see
    :mod:`curvkern._dispatch`). It is not saved in ``state_dict()``, so a checkpoint loads under
    every mode. State keys are the original's: ``G`` per parameter, and ``group_tau``,
    ``group_temp``, ``avg_energy`` in the state of each group's first parameter.

    Deliberate deviations from the original, each where it would crash or silently lose updates:
    hyperparameters are validated; an int ``initial_temp`` is cast to float (docs/hysterograd.md, G11);
    bf16/fp16 parameters keep ``G`` in fp32 and do their math in fp32, the result rounded to
    nearest even on store (the original keeps a bf16 ``G``); sparse gradients, complex parameters
    and a group spread over several devices raise.

    ``process_group`` (a ``torch.distributed.ProcessGroup``, default None) is for ``ZeroRedundancyOptimizer``
    (pass it through ``functools.partial``): each rank steps whole tensors, and each group's Σu², behind
    N̂, the clip and the gate, is summed over the ranks, so every rank steps and returns as one process
    would. None never communicates, as DDP needs. Not saved in ``state_dict()``; create the optimizer after
    ``init_process_group`` (``dist.group.WORLD`` is None before). TypeError for anything but a group or
    None, RuntimeError once its default group is destroyed, ValueError with ``capturable=True``
    (docs/distributed.md).

    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, hybrid meshes) step as their local shards,
    every statistic summed over the mesh dimensions each tensor is sharded on (one ``all_gather`` per group
    and step), so the result is one process's; their state is DTensor, for torch.distributed.checkpoint.
    A group that mixes DTensors and plain tensors raises TypeError (docs/distributed.md).

    Checks: tensor subclasses other than DTensor raise TypeError
    at construction; ``step()`` raises RuntimeError, naming the group, parameter and state key, before
    any group moves, if a gradient or state tensor does not match its parameter (shape, dtype, device,
    dense layout) or a state entry lacks a key; ``load_state_dict`` checks the same, validates the
    hyperparameters as the constructor does (one the checkpoint lacks takes the default) and leaves
    the optimizer as it was when it raises.
    """

    family = "hysterograd"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = _DEFAULTS.lr,
        stiffening_factor: float = _DEFAULTS.stiffening_factor,
        beta: float = _DEFAULTS.beta,
        epsilon: float = _DEFAULTS.epsilon,
        cooling_rate: float = _DEFAULTS.cooling_rate,
        initial_temp: float = _DEFAULTS.initial_temp,
        metric_scale: float = _DEFAULTS.metric_scale,
        adaptive_threshold: bool = _DEFAULTS.adaptive_threshold,
        grad_clip: float | None = _DEFAULTS.grad_clip,
        hysteresis_scale: float = _DEFAULTS.hysteresis_scale,
        *,
        fused: str = "auto",
        capturable: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.last_loss = None
        self.capturable = capturable
        # The group scalars of param groups this rank holds no parameter of (process_group): nowhere else to go.
        self._shareless_group_scalars: dict[int, dict[str, torch.Tensor]] = {}
        defaults = dict(
            lr=lr,
            stiffening_factor=stiffening_factor,
            beta=beta,
            epsilon=epsilon,
            cooling_rate=cooling_rate,
            initial_temp=initial_temp,
            metric_scale=metric_scale,
            adaptive_threshold=adaptive_threshold,
            grad_clip=grad_clip,
            hysteresis_scale=hysteresis_scale,
        )
        super().__init__(params, defaults, fused, process_group)

    def shock(self, factor: float = 0.5) -> None:
        """Scale τ by ``factor`` and raise T to at least 0.2 in every group that has stepped."""
        require_range("factor", factor, 0)
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                scalars = self.state.get(group["params"][0], {})
            else:  # a group this rank holds no parameter of (process_group)
                scalars = self._shareless_group_scalars.get(index, {})
            if "group_tau" in scalars:
                scalars["group_tau"].mul_(factor)
                scalars["group_temp"].clamp_(min=0.2)

    @torch.no_grad()
    def step(self, closure=None) -> tuple[str, float, float] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of every param group that has a gradient.

        Returns ``(status, g_norm, h_width)``: ``"Liquid"`` or ``"Frozen"`` and two Python floats. With
        ``capturable=True``, or while torch.compile traces the step, ``(liquid, g_norm, h_width)`` instead:
        0-dim tensors on the parameters' device (a bool and two float64) holding the same values, with no
        host read. Raises RuntimeError if a CUDA graph captures a step with ``capturable=False``,
        or if a gradient or state tensor does not match its parameter (before any group moves).
        """
        self._refuse_capture_unless_capturable()
        self.last_loss = None
        if closure is not None:
            with torch.enable_grad():
                self.last_loss = closure()

        self._check_step_inputs()  # every group, before the first one moves
        group_stats = []
        for index, (group, steps_now) in enumerate(zip(self.param_groups, self._groups_that_step(), strict=True)):
            if group["params"]:
                first_state = self.state[group["params"][0]]
            elif steps_now:
                first_state = self._shareless_group_scalars.setdefault(index, {})
            else:
                continue
            device = self._group_device(group)
            if "group_tau" not in first_state:  # as the original, also in a group without gradients
                scalar_dtype = torch.get_default_dtype()
                first_state["group_tau"] = torch.tensor(0.0, dtype=scalar_dtype, device=device)
                first_state["group_temp"] = torch.tensor(
                    float(group["initial_temp"]), dtype=scalar_dtype, device=device
                )
                first_state["avg_energy"] = torch.tensor(0.0, dtype=scalar_dtype, device=device)
            if not steps_now:
                continue  # the original skips the group: τ, T, E do not advance

            params, grads, metrics = [], [], []
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if "G" not in state:
                    state["G"] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)
                params.append(param)
                grads.append(grad)
                metrics.append(state["G"])

            _, step_fn = select(self.family, self.fused, device)
            state = HysteroGradState(
                metrics, first_state["group_tau"], first_state["group_temp"], first_state["avg_energy"]
            )
            hyperparameters = HysteroGradHyperparameters.from_group(group, device)
            group_stats.append(self._run_step(step_fn, params, grads, state, hyperparameters))

        # Skipped groups contribute 0 but still count: the original's means are diluted (docs/hysterograd.md).
        n_groups = len(self.param_groups)
        if self.capturable or torch.compiler.is_compiling():  # a host read would end a captured or traced graph
            return _stats_on_device(group_stats, n_groups, self.param_groups)
        # The one device-to-host read of the step; sums in Python floats, as the original.
        liquid, g_norm_sum, h_sum = False, 0.0, 0.0
        if group_stats:
            home = group_stats[0].device
            for g_norm, barrier, gate in torch.stack([s.to(home, torch.float64) for s in group_stats]).tolist():
                liquid, g_norm_sum, h_sum = liquid or gate > 0, g_norm_sum + g_norm, h_sum + barrier
        return ("Liquid" if liquid else "Frozen"), g_norm_sum / n_groups, h_sum / n_groups

    @staticmethod
    def _restore_entry(param: torch.Tensor, key: str, value):
        if not isinstance(value, torch.Tensor):
            return value  # _check_group_state names what it should be
        if key == "G":
            return state_like(param, value, state_dtype(param))
        if key in _GROUP_SCALARS and value.numel() == 1:
            # Checkpoints of the original hold an int64 temperature when initial_temp was an int.
            dtype = value.dtype if value.dtype in _SCALAR_DTYPES else torch.get_default_dtype()
            return value.detach().to(device=param.device, dtype=dtype, copy=True).reshape(())
        return value

    def _check_group_state(self, group_index: int, group: dict, state, layout: GroupLayout) -> None:
        """``G`` like its parameter (in the state dtype) wherever a parameter has state; the three group
        scalars, 0-dim float32 or float64 tensors of one dtype on the group's device, in the first
        parameter's state once any parameter of the group has state (they are created together)."""
        params = group["params"]
        entries = list(map(state.get, params))
        indices = [i for i, entry in enumerate(entries) if entry]
        if not indices:
            return
        first = entries[0]
        if not first:
            raise RuntimeError(
                f"{_NAME}: param group {group_index} has state but its first parameter lacks the group's "
                f"{sorted(_GROUP_SCALARS)}: is it another optimizer's checkpoint?"
            )
        # A first parameter without a gradient so far holds the group scalars alone.
        first_required = _FIRST_KEYS if "G" in first or _GROUP_SCALARS.isdisjoint(first) else _GROUP_SCALARS
        check_state_keys(_NAME, group_index, [0], [first], first_required, _FIRST_KEYS)
        with_metric = indices if "G" in first else indices[1:]
        rest = [entries[i] for i in indices[1:]]
        check_state_keys(_NAME, group_index, indices[1:], rest, _G, _G)
        check_like(
            _NAME,
            "state 'G'",
            group_index,
            with_metric,
            [entries[i]["G"] for i in with_metric],
            pick(params, with_metric),
            pick(layout.state_dtypes, with_metric),
            layout.device,
        )
        # One dtype for the three, float32 or float64 (the default dtype when they were created).
        dtypes = {getattr(first[key], "dtype", None) for key in _GROUP_SCALAR_ORDER}
        scalar_dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_SCALAR_DTYPES) else torch.float32
        for key in _GROUP_SCALAR_ORDER:
            check_like(_NAME, f"state '{key}'", group_index, [0], [first[key]], None, [scalar_dtype], layout.device)


def _stats_on_device(group_stats: list[torch.Tensor], n_groups: int, param_groups: list[dict]):
    """``(liquid, g_norm, h_width)`` as 0-dim device tensors: the returned tuple without a host read."""
    if not group_stats:
        device = next((p.device for group in param_groups for p in group["params"]), None)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return zero.bool(), zero, zero.clone()
    home = group_stats[0].device
    g_norm, barrier, gate = torch.stack([s.to(home, torch.float64) for s in group_stats]).unbind(1)
    return (gate > 0).any(), g_norm.sum() / n_groups, barrier.sum() / n_groups


HIOptimizer = HysteroGrad
