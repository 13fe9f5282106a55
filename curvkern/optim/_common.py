"""What both optimizers share: input checks, validation, low-precision policy, the FusedOptimizer base."""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from curvkern._dispatch import check_fused, is_dtensor, select
from curvkern.families import get_family
from curvkern.optim._distributed import (
    GroupReduction,
    ShardReduction,
    check_process_group,
    counts_here,
    local_gradients,
    local_state_entry,
    local_tensors,
    mesh_group,
    sharded_group_mesh,
)

# Parameters in these dtypes keep fp32 optimizer state and do their math in fp32; the result is
# written back to the parameter rounded to nearest even (a deliberate deviation from the originals,
# whose bf16/fp16 state loses small updates or overflows to inf/NaN).
LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """dtype of a parameter's optimizer state and of the elementwise math on it."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


@contextmanager
def updated_in_math_dtype(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``param`` to update in place in its math dtype (:func:`state_dtype`).

    A low-precision parameter is updated as an fp32 copy, written back rounded to nearest even.
    """
    if param.dtype not in LOW_PRECISION:
        yield param
        return
    work = param.float()
    yield work
    param.copy_(work)


# Flags every torch.optim optimizer (AdamW, SGD, ...) writes into its param groups and neither curvkern
# optimizer nor its original has: a checkpoint whose groups hold one is another optimizer's, even before
# it has any state. Other unknown keys load as they are (users and LR schedulers add keys of their own).
OTHER_OPTIMIZER_FLAGS = frozenset(
    {
        "foreach",
        "maximize",
        "differentiable",
        "amsgrad",
        "momentum",
        "dampening",
        "nesterov",
        "centered",
        "decoupled_weight_decay",
    }
)

# The only tensor types whose memory the kernels address directly (a DTensor's data_ptr() is 0).
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN = frozenset(PLAIN_TENSOR_TYPES)
_STRIDED = frozenset({torch.strided})
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_LOW_PRECISION = frozenset(LOW_PRECISION)
_layout, _nested, _dtype, _device, _grad = map(operator.attrgetter, ("layout", "is_nested", "dtype", "device", "grad"))
_SCALAR_SHAPE = torch.Size()

# The checks below run on every step over every tensor a kernel will touch. Each first takes C-level maps
# over a whole list (a per-tensor Python loop costs several times more); only when those find a mismatch
# does a per-tensor loop look for the culprit, to name it. Under torch.compile the loop alone runs: Dynamo
# cannot trace operator.attrgetter (each would be a graph break), the loop costs nothing after tracing, and
# the compiled step's guards re-check the metadata it read (type, shape, dtype, device, layout) on every call.


def parameter_name(group_index: int | None, param_index: int) -> str:
    group = "" if group_index is None else f" in param group {group_index}"
    return f"parameter {param_index}{group}"


def check_params(name: str, params: list[torch.Tensor], group_index: int | None = None) -> torch.device | None:
    """Reject what no backend supports; return the one device the tensors share (None if empty).

    Raises TypeError for a tensor subclass, a sparse or other non-strided layout, a complex or non-floating
    dtype; RuntimeError for a group on several devices. DTensor parameters are checked here as their local
    shards (:meth:`FusedOptimizer.add_param_group` unwraps them).
    """
    if not params:
        return None
    if not torch.compiler.is_compiling():
        device = _one_device_if_supported(params)
        if device is not None:
            return device
    return _check_params_one_by_one(name, params, group_index)


def _one_device_if_supported(params: list[torch.Tensor]) -> torch.device | None:
    try:
        devices = set(map(_device, params))
        if (
            _PLAIN.issuperset(map(type, params))
            and _STRIDED.issuperset(map(_layout, params))
            and not any(map(_nested, params))
            and _SUPPORTED.issuperset(map(_dtype, params))
            and len(devices) == 1
        ):
            return devices.pop()
    except Exception:  # noqa: BLE001 (something that is not a tensor: the loop names it)
        pass
    return None


def _check_params_one_by_one(name: str, params: list[torch.Tensor], group_index: int | None) -> torch.device:
    device = None
    for index, p in enumerate(params):
        if type(p) not in _PLAIN:
            raise TypeError(
                f"{name}: {parameter_name(group_index, index)} is a {type(p).__module__}.{type(p).__qualname__}; "
                f"the kernels address the memory of plain tensors (torch.Tensor, nn.Parameter, and the local "
                f"shards of DTensors) only, not of other tensor subclasses"
            )
        if p.layout != torch.strided or p.is_nested:
            raise TypeError(
                f"{name}: {parameter_name(group_index, index)} has layout {p.layout}; "
                f"only dense (strided) parameters are supported"
            )
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters (got one of dtype {p.dtype})")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} supports parameters of dtype float16, bfloat16, float32 and float64, got {p.dtype}"
            )
        if device is None:
            device = p.device
        elif p.device != device:
            raise RuntimeError(
                f"{name}: all parameters of a param group must be on one device, got {device} and "
                f"{p.device}; put parameters on different devices in different param groups"
            )
    return device


class GroupLayout:
    """What the kernels expect of a (checked) param group's tensors, per parameter, in group order."""

    def __init__(self, params: list[torch.Tensor], device: torch.device | None):
        self.device = device
        self.dtypes = [p.dtype for p in params] if torch.compiler.is_compiling() else list(map(_dtype, params))
        low_precision = not _LOW_PRECISION.isdisjoint(self.dtypes)
        self.state_dtypes = list(map(state_dtype, params)) if low_precision else self.dtypes


def pick(values: list, indices: list[int]) -> list:
    """``values`` at ``indices`` (increasing, without repeats: all of them when as many)."""
    return values if len(indices) == len(values) else [values[i] for i in indices]


def check_like(
    name: str,
    what: str,
    group_index: int,
    indices: list[int],
    tensors: list,
    like: list[torch.Tensor] | None,
    dtypes: list[torch.dtype],
    device: torch.device,
) -> None:
    """Raise RuntimeError unless each of ``tensors`` is what a kernel reads and writes in its place: a plain,
    dense (strided) tensor of the shape of the tensor at the same position in ``like`` (0-dim where ``like``
    is None) and the dtype at that position in ``dtypes``, on ``device``. ``tensors[k]`` belongs to parameter
    ``indices[k]`` of param group ``group_index``; the message names it and ``what`` it is (``"state 'G'"``).
    """
    if not torch.compiler.is_compiling() and _all_like(tensors, like, dtypes, device):
        return
    _check_like_one_by_one(name, what, group_index, indices, tensors, like, dtypes, device)


def _all_like(tensors: list, like: list[torch.Tensor] | None, dtypes: list[torch.dtype], device: torch.device) -> bool:
    try:
        # Tensor.is_same_size rather than shapes: a torch.Size is a tuple, and tuples by the ten thousand
        # wake the garbage collector.
        if (
            _PLAIN.issuperset(map(type, tensors))
            and _STRIDED.issuperset(map(_layout, tensors))
            and not any(map(_nested, tensors))
            and (
                all(map(torch.Tensor.is_same_size, tensors, like))
                if like is not None
                else not any(map(torch.Tensor.dim, tensors))
            )
            and list(map(_dtype, tensors)) == dtypes
            and set(map(_device, tensors)) <= {device}
        ):
            return True
    except Exception:  # noqa: BLE001 (something that is not a tensor: the loop names it)
        pass
    return False


def _check_like_one_by_one(
    name: str,
    what: str,
    group_index: int,
    indices: list[int],
    tensors: list,
    like: list[torch.Tensor] | None,
    dtypes: list[torch.dtype],
    device: torch.device,
) -> None:
    for k, (param_index, tensor, dtype) in enumerate(zip(indices, tensors, dtypes, strict=True)):
        shape = _SCALAR_SHAPE if like is None else like[k].shape
        if not isinstance(tensor, torch.Tensor):
            problem = f"is a {type(tensor).__name__}, not a tensor"
        elif type(tensor) not in _PLAIN:
            problem = f"is a {type(tensor).__qualname__}; the kernels take plain tensors only"
        elif tensor.layout != torch.strided or tensor.is_nested:
            problem = f"has layout {tensor.layout}; only dense (strided) tensors are supported"
        elif tensor.shape != shape:
            problem = f"has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        elif tensor.dtype != dtype:
            problem = f"has dtype {tensor.dtype}, expected {dtype}"
        elif tensor.device != device:
            problem = f"is on {tensor.device}, expected {device}"
        else:
            continue
        raise RuntimeError(f"{name}: {what} of {parameter_name(group_index, param_index)} {problem}")


def check_state_keys(
    name: str,
    group_index: int,
    indices: list[int],
    entries: list[Mapping],
    required: frozenset[str],
    allowed: frozenset[str],
) -> None:
    """Raise RuntimeError if a state entry lacks a key of ``required`` or holds one outside ``allowed``.
    ``entries[k]`` is the state of parameter ``indices[k]`` of param group ``group_index``."""
    if all(entry.keys() >= required and entry.keys() <= allowed for entry in entries):
        return
    for param_index, entry in zip(indices, entries, strict=True):
        missing = sorted(required - set(entry))
        unexpected = sorted(map(str, set(entry) - allowed))
        if missing or unexpected:
            problems = [f"lacks {missing}"] if missing else []
            problems += [f"has keys {unexpected} that {name} does not keep"] if unexpected else []
            raise RuntimeError(
                f"{name}: the state of {parameter_name(group_index, param_index)} {' and '.join(problems)}: "
                f"is it another optimizer's checkpoint?"
            )


def by_dtype(params: list[torch.Tensor], *companions: list) -> list[tuple[list, ...]]:
    """Split ``params`` and the lists parallel to it into one bucket per parameter dtype.

    A fused kernel streams one dtype at a time; a group that mixes dtypes (fp32 norms beside bf16
    weights) runs one call per dtype, in order of first appearance.
    """
    if not params:
        return []
    if len({p.dtype for p in params}) == 1:
        return [(params, *companions)]
    buckets: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(p.dtype, []).append(i)
    return [tuple([items[i] for i in indices] for items in (params, *companions)) for indices in buckets.values()]


def lr_as(lr: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """lr where the reference meets a tensor of ``dtype``: a tensor lr acts as the float it holds.

    A Python float meeting a tensor is converted to the tensor's dtype first; a 0-dim lr tensor is
    converted the same way here, so both give the same bits.
    """
    return lr.to(dtype) if isinstance(lr, torch.Tensor) else lr


def lr_tensor(lr: float | torch.Tensor) -> torch.Tensor:
    """lr as the C++ ops take it: a 0-dim tensor (a float is wrapped exactly, in float64)."""
    return lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)


class FusedOptimizer(torch.optim.Optimizer):
    """What both optimizers share around their step: ``fused=``, validation, checkpoint loading.

    ``fused`` is an attribute, not a hyperparameter: ``state_dict()`` does not carry it, so a
    checkpoint saved under one mode loads under every other.

    Every step checks, before any kernel runs on any group, that each gradient and state tensor is what
    the kernels will read and write (:meth:`_check_step_inputs`): a wrong shape would otherwise make a
    fused kernel read or write past the end of a tensor.
    """

    family: str  # the kernel family's name in curvkern.families.FAMILIES
    capturable: bool  # set by each optimizer's constructor

    def __init__(self, params, defaults: dict, fused: str, process_group: dist.ProcessGroup | None = None):
        self.fused = check_fused(fused)
        check_process_group(process_group, type(self).__name__)
        # Like fused, an attribute: state_dict() does not carry it.
        self.process_group = process_group
        self._reduction = GroupReduction(process_group) if process_group is not None else None
        self._refuse_capturable_with_process_group()
        super().__init__(params, defaults)

    def _refuse_capturable_with_process_group(self) -> None:
        """A step with ``process_group`` reads the groups' activity flags on the host, which a captured step
        cannot: raise ValueError, at construction and again at each step (``capturable`` may be set later)."""
        if self._reduction is not None and self.capturable:
            raise ValueError(
                f"{type(self).__name__}: capturable=True cannot be combined with process_group "
                "(a step then reads flags)"
            )

    def _groups_that_step(self) -> list[bool]:
        """Per param group, whether it steps: it has a gradient here, or with ``process_group`` on any rank
        of the group (the ranks must then all join its collective). One small collective per step."""
        local = [any(p.grad is not None for p in group["params"]) for group in self.param_groups]
        if self._reduction is None:
            return local
        self._refuse_capturable_with_process_group()
        return self._reduction.any_rank(local)

    def _run_step(self, step_fn, params: list, grads: list, state: tuple, hyperparameters):
        """``step_fn`` of the selected backend on one group's active tensors. A group of DTensors steps their local
        shards, with a :class:`ShardReduction` over its mesh summing each tensor's partials over its shards."""
        reduction = self._reduction
        if params and is_dtensor(params[0]):
            reduction = ShardReduction(mesh_group(params[0].device_mesh), list(map(counts_here, params)))
            params, grads = local_tensors(params), local_tensors(grads)
            state = type(state)(*map(local_tensors, state))
        return step_fn(params, grads, state, hyperparameters, reduction)

    def _local_view(self, group_index: int, group: dict, state: Mapping) -> tuple[dict, Mapping]:
        """``group`` and ``state`` as the kernels see them: for a group of DTensors, the local shards of its
        parameters and of their state (checked to be laid out like the parameters), else unchanged."""
        params = group["params"]
        if not params or not is_dtensor(params[0]):
            return group, state
        name = type(self).__name__
        local_state = {
            param.to_local(): local_state_entry(name, parameter_name(group_index, index), param, state[param])
            for index, param in enumerate(params)
            if param in state
        }
        return {**group, "params": local_tensors(params)}, local_state

    def _group_device(self, group: dict) -> torch.device:
        """The group's parameters' device; a rank that holds none of them joins the collective's device."""
        return group["params"][0].device if group["params"] else self._reduction.device

    def _validate_group(self, group: dict) -> None:
        """Raise ValueError, naming the hyperparameter, unless ``group``'s are valid: the check of the
        family's hyperparameter record (:mod:`curvkern.hyperparameters`)."""
        get_family(self.family).hyperparameters.validate(group)

    def _restore_entry(self, param: torch.Tensor, key: str, value):
        """A loaded state entry of ``param`` rebuilt in the dtype and on the device the step keeps it."""
        raise NotImplementedError

    def _check_group_state(
        self, group_index: int, group: dict, state: Mapping[torch.Tensor, dict], layout: GroupLayout
    ) -> None:
        """Raise RuntimeError unless the state of ``group``'s parameters in ``state`` is complete and
        every tensor in it has the shape, dtype, device and layout the kernels take."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name, group_index = type(self).__name__, len(self.param_groups) - 1
        try:
            self._validate_group(group)
            mesh = sharded_group_mesh(name, group["params"], group_index)
            if mesh is not None:
                if self._reduction is not None:
                    raise ValueError(
                        f"{name}: process_group is for ranks that hold whole tensors (ZeRO); param group "
                        f"{group_index} holds DTensors, whose statistics are summed over their own device mesh"
                    )
                mesh_group(mesh)  # a mesh the sums cannot run over fails here
            device = check_params(name, local_tensors(group["params"]), group_index)
            if device is not None:
                select(self.family, self.fused, device)  # an explicit backend that cannot run fails here
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _refuse_capture_unless_capturable(self) -> None:
        """Raise RuntimeError, as torch.optim's optimizers do, if ``step()`` is being captured in a CUDA graph
        and the optimizer was built with ``capturable=False`` (whose step keeps state or results on the host).

        Skipped while torch.compile traces the step, as torch skips it: the compiler decides whether its
        graph can be captured. Without CUDA this costs one call to ``torch.cuda.is_available()``.
        """
        if self.capturable or torch.compiler.is_compiling():
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"Attempting CUDA graph capture of step() for an instance of {type(self).__name__} but its "
                f"capturable is False; construct it with capturable=True to capture its step()"
            )

    def _check_step_inputs(self) -> None:
        """Check every group's parameters, gradients and state before the step touches any of them.

        Metadata only (type, layout, shape, dtype, device), in C-level passes over each list: no device
        sync, and no more work than a few attribute reads per tensor.
        """
        name = type(self).__name__
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params] if torch.compiler.is_compiling() else list(map(_grad, params))
            state = self.state
            if params and is_dtensor(params[0]):
                grads = local_gradients(name, group_index, params, grads)
                group, state = self._local_view(group_index, group, state)
                params = group["params"]
            layout = GroupLayout(params, check_params(name, params, group_index))
            active = [i for i, grad in enumerate(grads) if grad is not None]
            if len(active) != len(grads):
                grads = [grads[i] for i in active]
            check_like(
                name,
                "the gradient",
                group_index,
                active,
                grads,
                pick(params, active),
                pick(layout.dtypes, active),
                layout.device,
            )
            self._check_group_state(group_index, group, state, layout)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this optimizer (any ``fused`` mode) or of the original.

        Beyond torch's checks (as many groups, as many parameters per group), each loaded state tensor
        is checked against its parameter (shape, and that no key is missing or foreign), and each param
        group's hyperparameters are validated as the constructor validates them; one the checkpoint
        lacks takes the optimizer's default. Raises ValueError, TypeError or RuntimeError naming the
        group, parameter and key; the optimizer is then left as it was (the state is built aside and
        committed last).
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if (
            not isinstance(state_dict.get("state"), Mapping)
            or not isinstance(state_dict.get("param_groups"), list)
            or (not all(isinstance(group, Mapping) and "params" in group for group in state_dict["param_groups"]))
        ):
            raise ValueError(
                "an optimizer state dict holds 'state' (a dict) and 'param_groups' (a list of dicts "
                f"with 'params'), got keys {sorted(map(str, state_dict))}"
            )

        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups: {len(saved_groups)}, "
                f"the optimizer has {len(self.param_groups)}"
            )
        param_groups = []
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                    f"group: param group {group_index} has {len(saved['params'])} parameters in the state dict "
                    f"and {len(group['params'])} in the optimizer"
                )
            foreign = sorted(OTHER_OPTIMIZER_FLAGS.intersection(saved).difference(self.defaults))
            if foreign:
                raise ValueError(
                    f"{name}: param group {group_index} of the loaded state dict has {foreign}, "
                    f"hyperparameters of torch.optim's optimizers that {name} does not have: is it another "
                    f"optimizer's checkpoint?"
                )
            loaded = copy.deepcopy({key: value for key, value in saved.items() if key != "params"})
            for key, default in self.defaults.items():
                loaded.setdefault(key, default)  # an older or foreign checkpoint: as add_param_group fills
            loaded["params"] = group["params"]
            if "param_names" in group and "param_names" not in loaded:
                loaded["param_names"] = group["param_names"]
            self._validate_group(loaded)
            param_groups.append(loaded)

        id_map = {  # the checkpoint's parameter ids: the parameter, and its place to name in errors
            pid: (param, group_index, param_index)
            for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups))
            for param_index, (pid, param) in enumerate(zip(saved["params"], group["params"]))
        }
        state: defaultdict[torch.Tensor, dict] = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                state[pid] = saved  # state of no parameter: kept as is, as torch keeps it
                continue
            param, group_index, param_index = id_map[pid]
            where = parameter_name(group_index, param_index)
            if not isinstance(saved, Mapping):
                raise TypeError(f"{name}: the loaded state of {where} is a {type(saved).__name__}, expected a dict")
            entry = {}
            for key, value in saved.items():
                try:
                    entry[key] = self._restore_entry(param, key, value)
                except Exception as exc:
                    raise RuntimeError(f"{name}: cannot load state {key!r} of {where}: {exc}") from exc
            state[param] = entry
        for group_index, group in enumerate(param_groups):
            local_group, local_state = self._local_view(group_index, group, state)
            params = local_group["params"]
            layout = GroupLayout(params, params[0].device if params else None)
            self._check_group_state(group_index, local_group, local_state, layout)

        self.state, self.param_groups = state, param_groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
