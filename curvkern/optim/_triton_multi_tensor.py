"""What both Triton optimizers share: the chunk table, the launcher, and the device helpers.

The chunk table cuts a group's tensors into fixed-size work units ``(tensor slot, start, global chunk)``
that cross tensor boundaries, so one launch per pass covers the whole group whatever its number of
tensors (one launch per dtype combination: the element types are compile-time constants). Tensors are
reached through an int64 table of their addresses, cast to typed pointers inside the kernels; this works
both compiled and in the interpreter, whose loads dereference the same raw host addresses.

Layout: a parameter that is dense (contiguous, or a permutation of contiguous such as a transposed
matrix) is processed in its own memory order; its state (created with ``preserve_format``) shares its
strides, and a gradient with other strides is copied into the parameter's layout for the step. Only a
parameter with gaps (a slice, an expanded view) is copied to contiguous memory and back, with any state
that does not match. Offsets are int64 from the table on, so a tensor of more than 2³¹ elements works.
"""

from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._prims_common import is_non_overlapping_and_dense_or_false

from curvkern.optim._common import PLAIN_TENSOR_TYPES

# Elements per work unit, and per vector a program handles at once. 2^14 keeps 100M parameters at a
# few thousand programs (enough to fill the device) while 20,000 small tensors are one unit each.
CHUNK_SIZE = 1 << 14
BLOCK_SIZE = 1024

TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Kernel launches issued by this module (tests count them to check launches per step stay constant).
launch_count = 0


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch ``kernel`` with floating-point contraction off: the kernels write every fused multiply-add
    they want as ``tl.fma`` (where torch's own kernel fuses), and every other multiply and add rounds
    separately, in the order the eager reference rounds them."""
    global launch_count
    launch_count += 1
    kernel[grid](*args, enable_fp_fusion=False, **kwargs)


@dataclass
class Bucket:
    """The tensors of a group that share their element types, and their chunks."""

    dtypes: tuple[torch.dtype, ...]  # one per role
    addresses: torch.Tensor  # int64 [roles, tensors]
    tensor_index: torch.Tensor  # int64 [tensors]: position in the group
    numels: torch.Tensor  # int64 [tensors]
    chunks: torch.Tensor  # int64 [3, chunks]: slot in the bucket, first element, global chunk id
    num_tensors: int
    num_chunks: int
    alignment: int  # 16 when every address is 16-byte aligned (vector loads), else 1


@dataclass
class ChunkTable:
    buckets: list[Bucket]
    chunk_begin: torch.Tensor  # int64 [tensors + 1]: the group's global chunk ids of each tensor
    numels: torch.Tensor  # int64 [tensors], in group order
    num_tensors: int
    num_chunks: int


_TABLES: OrderedDict[tuple, ChunkTable] = OrderedDict()
_dtype_of = operator.attrgetter("dtype")
_MAX_CACHED_TABLES = 16


def chunk_layout(numels: Sequence[int], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(owner, start, chunk_begin)`` for tensors of ``numels`` elements, with no per-element loop.

    ``owner[c]`` is the tensor of chunk ``c``, ``start[c]`` its first element (int64: a tensor may hold
    more than 2³¹ elements), ``chunk_begin[i]`` the first chunk of tensor ``i`` (length ``n + 1``).
    Host tensors, built from Python ints (reading a tensor back would be a host sync on the GPU path).
    """
    counts = [-(-n // chunk_size) for n in numels]  # 0 for an empty tensor
    chunk_begin = [0, *itertools.accumulate(counts)]
    owner = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(counts, dtype=torch.int64))
    start = (torch.arange(chunk_begin[-1]) - torch.tensor(chunk_begin[:-1], dtype=torch.int64)[owner]) * chunk_size
    return owner, start, chunk_begin


def build_table(roles: Sequence[Sequence[torch.Tensor]], device: torch.device, chunk_size: int) -> ChunkTable:
    """The chunk table of ``roles`` (lists of equally long tensor lists: params, grads, state...).

    Cached by the tensors' addresses, sizes and dtypes: a steady-state step only gathers those (with
    C-level ``map``s: 20,000 tensors are then a few milliseconds) and reuses the device table.
    """
    num_tensors = len(roles[0])
    flat = list(itertools.chain.from_iterable(roles))  # role-major, as the address table
    pointers = list(map(torch.Tensor.data_ptr, flat))
    dtypes = list(map(_dtype_of, flat))
    all_numels = tuple(map(torch.Tensor.numel, flat))
    key = (chunk_size, device, tuple(pointers), all_numels, tuple(dtypes))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    _check_addressable(roles, pointers, all_numels, device)  # a table is cached only once checked

    numel_list = list(all_numels[:num_tensors])
    numels = torch.tensor(numel_list, dtype=torch.int64)
    owner, start, chunk_begin = chunk_layout(numel_list, chunk_size)
    addresses = torch.tensor(pointers, dtype=torch.int64).view(len(roles), num_tensors)
    dtype_rows = list(zip(*(dtypes[i * num_tensors : (i + 1) * num_tensors] for i in range(len(roles)))))

    host_parts, buckets_meta = [], []
    for bucket_dtypes in dict.fromkeys(dtype_rows):  # first-seen order; almost always one
        member_list = [i for i, row in enumerate(dtype_rows) if row == bucket_dtypes]
        members = torch.tensor(member_list, dtype=torch.int64)
        slot_of = torch.full((num_tensors,), -1, dtype=torch.int64)
        slot_of[members] = torch.arange(len(members))
        chunk_ids = torch.nonzero(slot_of[owner] >= 0).flatten()
        chunks = torch.stack([slot_of[owner[chunk_ids]], start[chunk_ids], chunk_ids])
        member_pointers = (
            pointers
            if len(member_list) == num_tensors
            else [pointers[role * num_tensors + i] for role in range(len(roles)) for i in member_list]
        )
        aligned = chunk_size % 16 == 0 and not any(map((15).__and__, member_pointers))
        host_parts += [addresses[:, members].flatten(), members, numels[members], chunks.flatten()]
        buckets_meta.append((bucket_dtypes, len(member_list), chunks.shape[1], 16 if aligned else 1))
    host_parts += [torch.tensor(chunk_begin, dtype=torch.int64), numels]

    # One host-to-device copy for the whole table; the pieces are views of it, each padded to 16 bytes so
    # that Triton's pointer-alignment specialization sees the same alignment whatever the table.
    lengths = [len(part) for part in host_parts]
    padded = [torch.nn.functional.pad(part, (0, len(part) % 2)) for part in host_parts]
    flat_table = torch.cat(padded).to(device)
    pieces = iter(view[:length] for view, length in zip(torch.split(flat_table, [len(p) for p in padded]), lengths))
    buckets = []
    for bucket_dtypes, bucket_size, num_chunks, alignment in buckets_meta:
        member_addresses, members, member_numels, chunks = (next(pieces) for _ in range(4))
        buckets.append(
            Bucket(
                dtypes=bucket_dtypes,
                addresses=member_addresses.view(len(roles), bucket_size),
                tensor_index=members,
                numels=member_numels,
                chunks=chunks.view(3, num_chunks),
                num_tensors=bucket_size,
                num_chunks=num_chunks,
                alignment=alignment,
            )
        )
    table = ChunkTable(buckets, next(pieces), next(pieces), num_tensors, chunk_begin[-1])
    _TABLES[key] = table
    if len(_TABLES) > _MAX_CACHED_TABLES:
        _TABLES.popitem(last=False)
    return table


def _check_addressable(
    roles: Sequence[Sequence[torch.Tensor]], pointers: Sequence[int], numels: Sequence[int], device: torch.device
) -> None:
    """Raise unless every address of the table is safe for the kernels to use.

    A kernel reads and writes each tensor of a row for as many elements as the row's parameter (role 0)
    has, at the address in the table: every tensor must be a plain strided tensor on ``device``, of that
    many elements, at a non-null address (a DTensor's is null). The caller checks shapes, dtypes and
    state by name; this is the last line, for any caller.
    """
    num_tensors = len(roles[0])
    for role_index, role in enumerate(roles):
        if len(role) != num_tensors:
            raise RuntimeError(
                f"Triton chunk table: role {role_index} has {len(role)} tensors, role 0 has {num_tensors}"
            )
        for slot, tensor in enumerate(role):
            flat_index = role_index * num_tensors + slot
            where = f"Triton chunk table: tensor {slot} of role {role_index}"
            if type(tensor) not in PLAIN_TENSOR_TYPES:
                raise TypeError(
                    f"{where} is a {type(tensor).__qualname__}; only plain tensors have an address the "
                    f"kernels can use (DTensor and other tensor subclasses are not supported)"
                )
            if tensor.layout != torch.strided:
                raise RuntimeError(f"{where} has layout {tensor.layout}; expected a dense (strided) tensor")
            if tensor.device != device:
                raise RuntimeError(f"{where} is on {tensor.device}, expected {device}")
            if numels[flat_index] != numels[slot]:
                raise RuntimeError(f"{where} has {numels[flat_index]} elements, its parameter {numels[slot]}")
            if numels[flat_index] and not pointers[flat_index]:
                raise RuntimeError(f"{where} has {numels[flat_index]} elements at a null address")


class DenseLayout:
    """The roles ``[params, grads, *states]`` in a form the kernels can stream in memory order.

    Every tensor of a parameter must share the parameter's layout: a dense parameter keeps its own, a
    parameter with gaps is replaced by a contiguous copy; a gradient or state in another layout is
    copied into it. ``finish()`` writes the copies of parameters and state back. When everything is
    contiguous (the usual case) this costs one C-level pass and copies nothing.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[Sequence[torch.Tensor]]
    ):
        self._write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        roles = [params, grads, *states]
        if all(map(torch.Tensor.is_contiguous, itertools.chain.from_iterable(roles))):
            self.roles = [list(role) for role in roles]
            return
        self.roles = [[] for _ in roles]
        for row in zip(*roles, strict=True):
            param, grad, *state = row
            reference = self._reference(param)
            work = [reference, self._readable(grad, reference), *(self._writable(t, reference) for t in state)]
            for role, tensor in zip(self.roles, work):
                role.append(tensor)

    def _reference(self, param: torch.Tensor) -> torch.Tensor:
        if param.is_contiguous() or is_non_overlapping_and_dense_or_false(param):
            return param
        return self._writable(param, torch.empty_like(param, memory_format=torch.contiguous_format))

    @staticmethod
    def _readable(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if tensor is like or tensor.numel() <= 1 or tensor.stride() == like.stride():
            return tensor
        return torch.empty_like(like, dtype=tensor.dtype).copy_(tensor)

    def _writable(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        work = self._readable(tensor, like)
        if work is not tensor:
            self._write_back.append((tensor, work))
        return work

    def finish(self) -> None:
        for original, work in self._write_back:
            original.copy_(work)
        self._write_back.clear()


_DEVICE_VECTORS: dict[tuple, torch.Tensor] = {}


def device_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, copied once per distinct value tuple."""
    key = (tuple(values), device)
    vector = _DEVICE_VECTORS.get(key)
    if vector is None:
        vector = _DEVICE_VECTORS[key] = torch.tensor(values or [0.0], dtype=torch.float64).to(device)
    return vector


def device_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 scalar the kernels load: a 0-dim tensor as it is, a float filled in on ``device``."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((), value, dtype=torch.float64, device=device)  # a fill, not a copy


def lr_arguments(lr: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """lr as the compile-time ops take it (an op's argument has one type): ``(lr, None)`` for a float,
    ``(0.0, lr)`` for a tensor."""
    return (0.0, lr) if isinstance(lr, torch.Tensor) else (float(lr), None)


# ---------------------------------------------------------------------------- device helpers


@triton.jit
def chunk_range(chunks, numels, num_chunks, chunk, CHUNK: tl.constexpr):
    """Chunk ``chunk`` of the table: the slot of its tensor and its element range [start, end)."""
    slot = tl.load(chunks + chunk)
    start = tl.load(chunks + num_chunks + chunk)
    return slot, start, tl.minimum(start + CHUNK, tl.load(numels + slot))


@triton.jit
def tensor_pointer(addresses, role, num_tensors, slot, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """The tensor of ``role`` in ``slot`` of the address table, as a ``DTYPE`` pointer aligned to ``ALIGN``."""
    return tl.multiple_of(tl.load(addresses + role * num_tensors + slot).to(tl.pointer_type(DTYPE)), ALIGN)


@triton.jit
def in_dtype(value, DTYPE: tl.constexpr):
    """A float64 argument rounded to ``DTYPE``, as torch rounds a Python scalar. Added to a float64 zero
    first, so that it is a tensor both compiled and interpreted."""
    return (tl.zeros([], tl.float64) + value).to(DTYPE)


@triton.jit
def sqrt_rn(x):
    # tl.sqrt of fp32 is an approximation on the GPU; torch's is correctly rounded.
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def div_rn(x, y):
    # Likewise fp32 division.
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def store_rounded(pointer, value, mask, dtype: tl.constexpr):
    """Store fp32 ``value`` as ``dtype``. bf16 is rounded to nearest even by hand, because the
    interpreter truncates; a NaN is stored as the quiet NaN 0x7FC0 (rounding its bits could give inf)."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(pointer, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(pointer, value.to(dtype), mask=mask)


@triton.jit
def per_tensor_sums_kernel(
    partials,
    sums,
    chunk_begin,
    tensor_index,
    NUM_SUMS: tl.constexpr,
    SUMS_WIDTH: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
):
    """One program per tensor of a bucket: add its chunks' partial sums in chunk order, in the state
    dtype (as the eager reference sums a tensor), and store them widened to float64."""
    slot = tl.program_id(0)
    tensor = tl.load(tensor_index + slot)
    first = tl.load(chunk_begin + tensor)
    last = tl.load(chunk_begin + tensor + 1)
    columns = tl.arange(0, SUMS_WIDTH)
    used = columns < NUM_SUMS
    total = tl.zeros([SUMS_WIDTH], STATE_DTYPE)
    for chunk in range(first, last):
        total += tl.load(partials + chunk * NUM_SUMS + columns, mask=used, other=0.0).to(STATE_DTYPE)
    tl.store(sums + tensor * NUM_SUMS + columns, total.to(tl.float64), mask=used)


def per_tensor_sums(table: ChunkTable, partials: torch.Tensor, num_sums: int, state_role: int) -> torch.Tensor:
    """``[tensors, num_sums]`` float64: each tensor's sums from pass A's per-chunk partials."""
    sums = torch.empty((table.num_tensors, num_sums), dtype=torch.float64, device=partials.device)
    for bucket in table.buckets:
        if bucket.num_tensors:
            launch(
                per_tensor_sums_kernel,
                (bucket.num_tensors,),
                partials,
                sums,
                table.chunk_begin,
                bucket.tensor_index,
                NUM_SUMS=num_sums,
                SUMS_WIDTH=triton.next_power_of_2(num_sums),
                STATE_DTYPE=TRITON_DTYPES[bucket.dtypes[state_role]],
            )
    return sums
