"""curvkern.cross_entropy and ce_hvp take F.cross_entropy's shapes, classes in dim 1, on every backend.

Each case compares the loss, the gradient, the double backward (to the logits and to the incoming gradient)
and ce_hvp with PyTorch's own ``F.cross_entropy`` and its autograd double backward. The square cases
(C equal to a spatial size) are the ones where taking the classes from the wrong dimension gives a number
instead of an error.
"""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiprocess_ranks import free_port
from test_cross_entropy import loss_grad_hvp

import curvkern
import curvkern.ce.function as ce_function
from curvkern.families import get_family
from curvkern.integrations import eigenthings as ck_eigenthings

FAMILY = get_family("cross_entropy")
# Triton's interpreter computes with numpy, which warns on the masked-out lanes of ignored rows.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")
REDUCTIONS = ["mean", "sum", "none"]
# fp64 against fp64: both sides round the same few-term sums, so a handful of ulps apart.
FP64 = dict(rtol=1e-12, atol=1e-15)
IGNORE_INDEX = -100

# (logits shape, target shape); "square" where C equals a spatial size.
SHAPES = {
    "C": ((5,), ()),
    "N,C": ((4, 5), (4,)),
    "N,C,d1-square": ((3, 4, 4), (3, 4)),
    "N,C,d1": ((3, 4, 6), (3, 6)),
    "N,C,d1,d2-square": ((2, 3, 3, 3), (2, 3, 3)),
    "N,C,d1,d2": ((2, 3, 4, 5), (2, 4, 5)),
}


def class_dim_problem(shape, target_shape, *, device, dtype=torch.float64, seed=0, ignored=0):
    """Logits, targets in [0, C) (``ignored`` of them set to ignore_index) and a tangent u like the logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    classes = shape[1] if len(shape) > 1 else shape[0]
    target = torch.randint(0, classes, target_shape, generator=gen)
    target.view(-1)[:ignored] = IGNORE_INDEX
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return logits.to(device), target.to(device), u.to(device)


def ours(backend):
    return lambda z, y, **kw: curvkern.cross_entropy(z, y, fused=backend, **kw)


def assert_matches_torch(backend, logits, target, u, reduction, **kwargs):
    """Loss, gradient, double backward (random incoming gradient) and ce_hvp against F.cross_entropy."""
    grad_loss_shape = target.shape if reduction == "none" else ()
    grad_loss = torch.rand(grad_loss_shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(1)) + 0.5
    grad_loss = grad_loss.to(logits.device)
    expected = loss_grad_hvp(F.cross_entropy, logits, target, u, grad_loss, reduction=reduction, **kwargs)
    actual = loss_grad_hvp(ours(backend), logits, target, u, grad_loss, reduction=reduction, **kwargs)
    for name, a, e in zip(["loss", "grad", "hvp", "grad_grad_loss"], actual, expected):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, msg=name, **FP64)
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)  # label smoothing does not enter the Hessian
    hvp = curvkern.ce_hvp(logits, target, u, reduction=reduction, ignore_index=ignore_index, fused=backend)
    assert hvp.shape == logits.shape
    expected_hvp = loss_grad_hvp(F.cross_entropy, logits, target, u, reduction=reduction, ignore_index=ignore_index)[2]
    torch.testing.assert_close(hvp, expected_hvp, **FP64)
    return actual


def test_square_case_takes_classes_from_dim_1(backend, device):
    """Classes in dim 1: the loss is 1.68092451954598…; classes last would give 0.68092451954598…."""
    logits = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]], dtype=torch.float64, device=device)
    target = torch.tensor([[0, 0]], device=device)
    loss = curvkern.cross_entropy(logits, target, fused=backend)
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=0)
    # Elements (0, 0) and (0, 1) have class logits (0, 3) and (1, 0), both of target class 0.
    closed_form = (math.log1p(math.exp(3.0)) + math.log1p(math.e) - 1.0) / 2
    assert closed_form == pytest.approx(1.6809245195459825, rel=1e-15, abs=0)
    assert loss.item() == pytest.approx(closed_form, rel=1e-15, abs=0)
    assert_matches_torch(backend, logits, target, torch.randn_like(logits), "mean")


@pytest.mark.parametrize("case", SHAPES, ids=list(SHAPES))
def test_every_shape_and_reduction_matches_torch(backend, device, case):
    shape, target_shape = SHAPES[case]
    ignored = 0 if case == "C" else 2
    logits, target, u = class_dim_problem(shape, target_shape, device=device, ignored=ignored)
    for reduction in REDUCTIONS:
        actual = assert_matches_torch(backend, logits, target, u, reduction)
        if reduction == "none":
            assert actual[0].shape == target.shape
    assert_matches_torch(backend, logits, target, u, "mean", label_smoothing=0.2)
    if ignored:  # ignored elements: gradient and HVP exactly 0 along their classes
        grad, hvp = loss_grad_hvp(ours(backend), logits, target, u)[1:3]
        ignored_mask = (target == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
        assert torch.count_nonzero(grad[ignored_mask]) == 0 and torch.count_nonzero(hvp[ignored_mask]) == 0


def test_uint8_targets(backend, device):
    """F.cross_entropy takes uint8 class indices for (N, C) logits (ignore_index then a value in [0, 255]);
    curvkern takes them for every shape, with the int64 targets' results."""
    for shape, target_shape in [((4, 5), (4,)), ((3, 4, 5), (3, 5))]:
        logits, target, u = class_dim_problem(shape, target_shape, device=device)
        target.view(-1)[1] = 255
        for reduction in REDUCTIONS:
            assert_matches_torch(backend, logits, target, u, reduction, ignore_index=255)
            int64_results, uint8_results = (
                loss_grad_hvp(ours(backend), logits, labels, u, reduction=reduction, ignore_index=255)
                for labels in [target, target.to(torch.uint8)]
            )
            for a, e in zip(uint8_results, int64_results):
                assert torch.equal(a, e)


def test_non_contiguous_inputs(backend, device):
    logits, target, u = class_dim_problem((3, 4, 5), (3, 5), device=device, ignored=1)
    expected = loss_grad_hvp(F.cross_entropy, logits, target, u, reduction="none")
    # Classes dense (stride 1) in a (N, C, d) view, and every other element of a wider spatial dimension.
    classes_dense = logits.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.full((3, 4, 10), float("nan"), dtype=torch.float64, device=device)
    wide[:, :, ::2] = logits
    strided_target = torch.cat([target, target]).view(2, 3, 5)[1]  # a view with an offset
    for z, w in [(classes_dense, u.transpose(1, 2).contiguous().transpose(1, 2)), (wide[:, :, ::2], u.flip(0).flip(0))]:
        assert not z.is_contiguous()
        actual = loss_grad_hvp(ours(backend), z, strided_target, w, reduction="none")
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, **FP64)
        torch.testing.assert_close(
            curvkern.ce_hvp(z, target.t().contiguous().t(), w, reduction="none", fused=backend), expected[2], **FP64
        )
    # ``out`` in the logits' (N, C, d) shape, contiguous or not: written in place and returned.
    for out in [
        torch.empty(3, 4, 5, dtype=torch.float64, device=device),
        torch.empty(3, 5, 4, dtype=torch.float64, device=device).transpose(1, 2),
    ]:
        assert curvkern.ce_hvp(logits, target, u, reduction="none", out=out, fused=backend) is out
        torch.testing.assert_close(out, expected[2], **FP64)


@pytest.mark.parametrize(
    "shape,target_shape", [((0, 4), (0,)), ((0, 4, 3), (0, 3)), ((2, 4, 0), (2, 0))], ids=["0,C", "0,C,d1", "N,C,0"]
)
def test_empty(backend, device, shape, target_shape):
    """Nothing to reduce: mean is NaN, sum 0, none empty, gradients and HVPs empty, as PyTorch."""
    logits, target, u = class_dim_problem(shape, target_shape, device=device)
    for reduction in REDUCTIONS:
        expected = loss_grad_hvp(F.cross_entropy, logits, target, u, reduction=reduction)
        actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction)
        for a, e in zip(actual, expected):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, equal_nan=True, **FP64)
        assert curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend).shape == shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_against_fp64_truth(backend, device, reduction):
    """fp32 logits: each result within a bound set by its summation length, against fp64 on the same inputs.

    Every result is a C-term sum per element (log-sum-exp, ⟨p, u⟩) and, for mean and sum, the loss a
    further sum over the M elements; a k-term fp32 sum of same-signed terms is within k·2⁻²⁴ relative
    (Higham's γ_k), and exp/log add a few ulps per term: 4·k·2⁻²³ in ‖a − b‖/‖b‖.
    """
    logits64, target, u64 = class_dim_problem((3, 7, 5), (3, 5), device=device, ignored=2)
    logits, u = logits64.float(), u64.float()
    truth = loss_grad_hvp(F.cross_entropy, logits.double(), target, u.double(), reduction=reduction)
    actual = loss_grad_hvp(ours(backend), logits, target, u, reduction=reduction)
    classes, elements = 7, target.numel()
    summed = classes + (elements if reduction != "none" else 0)
    bounds = {"loss": summed, "grad": classes, "hvp": classes}
    for name, a, e in zip(bounds, actual, truth):
        assert a.dtype == torch.float32, name
        error = ((a.double() - e).norm() / e.norm()).item()
        assert error <= 4 * bounds[name] * torch.finfo(torch.float32).eps, (name, error)
    hvp = curvkern.ce_hvp(logits, target, u, reduction=reduction, fused=backend)
    error = ((hvp.double() - truth[2]).norm() / truth[2].norm()).item()
    assert error <= 4 * classes * torch.finfo(torch.float32).eps


# --- errors -----------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    # name: (logits shape, target, expected error), the target built from the logits' device.
    "N,C target batch": ((3, 4), lambda: torch.zeros(2, dtype=torch.int64), ValueError),
    "N,C target 2-D": ((3, 4), lambda: torch.zeros(3, 5, dtype=torch.int64), RuntimeError),
    "N,C,d target of classes last": ((3, 4, 5), lambda: torch.zeros(3, 4, dtype=torch.int64), RuntimeError),
    "N,C,d target 1-D": ((3, 4, 5), lambda: torch.zeros(3, dtype=torch.int64), RuntimeError),
    "N,C,d1,d2 target wrong": ((2, 3, 4, 5), lambda: torch.zeros(2, 4, 4, dtype=torch.int64), RuntimeError),
    "C target 1-D": ((4,), lambda: torch.zeros(3, dtype=torch.int64), ValueError),
    "int32 target": ((3, 4), lambda: torch.zeros(3, dtype=torch.int32), RuntimeError),
    "float target": ((3, 4, 5), lambda: torch.zeros(3, 5), RuntimeError),
    "bool target": ((3, 4), lambda: torch.zeros(3, dtype=torch.bool), RuntimeError),
}


@pytest.fixture
def no_kernel_selected(monkeypatch):
    """Fails a test in which a backend is selected: argument errors must come before any kernel."""

    def select(*args, **kwargs):
        raise AssertionError("a backend was selected before the argument check")

    monkeypatch.setattr(ce_function, "select", select)


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=list(BAD_ARGUMENTS))
def test_shape_and_dtype_errors_like_torch(backend, device, case, no_kernel_selected):
    shape, make_target, error = BAD_ARGUMENTS[case]
    logits = torch.zeros(shape, dtype=torch.float64, device=device)
    target = make_target().to(device)
    with pytest.raises(error):
        F.cross_entropy(logits, target)  # the error type PyTorch raises
    with pytest.raises(error, match="target"):
        curvkern.cross_entropy(logits, target, fused=backend)
    with pytest.raises(error, match="target"):
        curvkern.ce_hvp(logits, target, torch.zeros_like(logits), fused=backend)


def test_class_probabilities_and_weights_equal_torch_or_raise(backend, device):
    """F.cross_entropy's class probabilities and class weights: equal to PyTorch's on a backend that implements
    them (tests/test_cross_entropy_variants.py checks the derivatives), NotImplementedError naming them and
    the backend on one that does not; never another number."""
    logits, target, u = class_dim_problem((3, 4, 5), (3, 5), device=device)
    probabilities = torch.softmax(logits, dim=1)
    weight = torch.linspace(0.5, 2.0, 4, dtype=torch.float64, device=device)
    kernels = ce_function.select(ce_function.FAMILY, backend, torch.device(device))[1]
    for variant, args in (("probability targets", (probabilities,)), ("weight", (target, weight))):
        if variant in kernels.VARIANTS:
            torch.testing.assert_close(
                curvkern.cross_entropy(logits, *args, fused=backend), F.cross_entropy(logits, *args), rtol=1e-12, atol=0
            )
            continue
        with pytest.raises(NotImplementedError, match=f"{backend}.*{variant}"):
            curvkern.cross_entropy(logits, *args, fused=backend)
    if "probability targets" not in kernels.VARIANTS:
        with pytest.raises(NotImplementedError, match=f"{backend}.*probability targets"):
            curvkern.ce_hvp(logits, probabilities, u, fused=backend)


def test_unsupported_arguments_raise(backend, device, no_kernel_selected):
    """What curvkern does not take raises before any kernel; it never gives another number."""
    logits, target, u = class_dim_problem((3, 4, 5), (3, 5), device=device)
    with pytest.raises(ValueError, match="0-dim"):
        curvkern.cross_entropy(logits[0, 0, 0], target[0, 0], fused=backend)
    if device == "cpu":  # a label valid for the last dimension (d = 5) but not for the C = 4 classes
        with pytest.raises(IndexError, match="Target 4 is out of bounds"):
            curvkern.cross_entropy(logits, torch.full_like(target, 4), fused=backend)
    # u and out must have the logits' (N, C, d) shape, not the classes-last one.
    with pytest.raises(ValueError, match="u must have the logits' shape"):
        curvkern.ce_hvp(logits, target, u.movedim(1, -1).contiguous(), fused=backend)
    with pytest.raises(ValueError, match="out must match"):
        curvkern.ce_hvp(logits, target, u, out=torch.empty(3, 5, 4, dtype=torch.float64, device=device), fused=backend)


# --- hessian-eigenthings: (B, T, V) logits, classes last -------------------------------------------------


def test_eigenthings_objects_keep_classes_last(backend, device):
    """T == V: the one shape where reading the classes from dim 1 would give a number, not an error."""
    batch_size, length, vocabulary = 2, 4, 4
    logits, labels, u = class_dim_problem((batch_size, length, vocabulary), (batch_size, length), device=device)
    labels[0, 2] = IGNORE_INDEX

    def shifted_loss(z, y):
        return F.cross_entropy(z[:, :-1].reshape(-1, vocabulary), y[:, 1:].reshape(-1))

    causal = ck_eigenthings.hf_lm_loss_of_output(fused=backend)
    expected = loss_grad_hvp(shifted_loss, logits, labels, u)
    for a, e in zip(loss_grad_hvp(causal, logits, {"labels": labels}, u), expected):
        torch.testing.assert_close(a, e, **FP64)
    torch.testing.assert_close(causal.hvp(logits, {"labels": labels}, u), expected[2], **FP64)

    plain = ck_eigenthings.cross_entropy_loss_of_output(fused=backend)
    rows = lambda z: z.reshape(-1, vocabulary)  # noqa: E731
    expected = loss_grad_hvp(lambda z, y: F.cross_entropy(rows(z), y.reshape(-1)), logits, labels, u)
    for a, e in zip(loss_grad_hvp(plain, logits, (None, labels), u), expected):
        torch.testing.assert_close(a, e, **FP64)
    torch.testing.assert_close(plain.hvp(logits, (None, labels), u), expected[2], **FP64)


# --- DTensor ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_mesh():
    """A 1-rank gloo process group on 127.0.0.1 and its CPU device mesh, destroyed afterwards."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_arguments_on_one_rank(backend, device, one_rank_mesh):
    """On a 1-rank mesh class-sharded logits hold the whole vocabulary: the plain results, as DTensors (more
    ranks: tests/test_distributed_ce.py). The hessian-eigenthings loss objects take plain tensors only."""
    if device != "cpu":
        pytest.skip("the test's process group and mesh are on CPU")
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    logits, target, u = class_dim_problem((6, 5), (6,), device=device)
    sharded = distribute_tensor(logits, one_rank_mesh, [Shard(1)])
    replicated_u = distribute_tensor(u, one_rank_mesh, [Replicate()])
    loss = curvkern.cross_entropy(sharded, target, fused=backend)
    torch.testing.assert_close(loss.full_tensor(), curvkern.cross_entropy(logits, target, fused=backend), **FP64)
    hvp = curvkern.ce_hvp(sharded, target, distribute_tensor(u, one_rank_mesh, [Shard(1)]), fused=backend)
    torch.testing.assert_close(hvp.full_tensor(), curvkern.ce_hvp(logits, target, u, fused=backend), **FP64)
    with pytest.raises(ValueError, match="u has placements"):
        curvkern.ce_hvp(sharded, target, replicated_u, fused=backend)
    with pytest.raises(NotImplementedError, match="need DTensor logits"):
        curvkern.ce_hvp(logits, target, replicated_u, fused=backend)
    message = r"DTensor.*takes plain torch\.Tensor.*DistributedDataParallel.*curvkern\.cross_entropy"
    sequences = sharded.redistribute(one_rank_mesh, [Replicate()]).view(2, 3, 5)
    labels = {"labels": target.view(2, 3)}
    causal = ck_eigenthings.hf_lm_loss_of_output(fused=backend)
    with pytest.raises(NotImplementedError, match=message):
        causal(sequences, labels)
    with pytest.raises(NotImplementedError, match=message):
        causal.hvp(sequences, labels, u.view(2, 3, 5))
    with pytest.raises(NotImplementedError, match=message):
        causal.hvp(logits.view(2, 3, 5), labels, replicated_u.view(2, 3, 5))
    plain = ck_eigenthings.cross_entropy_loss_of_output(fused=backend)
    with pytest.raises(NotImplementedError, match=message):
        plain(sharded, (None, target))
    with pytest.raises(NotImplementedError, match=message):
        plain.hvp(sharded, (None, target), u)


def test_dtensor_logits_refuse_the_loss_variants(backend, device, one_rank_mesh):
    """The vocabulary-parallel path implements no loss variant yet: each raises naming it, never another
    number (docs/cross_entropy.md, "Loss variants")."""
    if device != "cpu":
        pytest.skip("the test's process group and mesh are on CPU")
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, target, u = class_dim_problem((6, 5), (6,), device=device)
    sharded = distribute_tensor(logits, one_rank_mesh, [Shard(1)])
    sharded_u = distribute_tensor(u, one_rank_mesh, [Shard(1)])
    variants = {
        "z_loss": dict(z_loss=0.1),
        "softcap": dict(softcap=5.0),
        "weight": dict(weight=torch.ones(5, dtype=torch.float64)),
    }
    for name, kwargs in variants.items():
        with pytest.raises(NotImplementedError, match=f"{name} on DTensor logits"):
            curvkern.cross_entropy(sharded, target, fused=backend, **kwargs)
        with pytest.raises(NotImplementedError, match=f"{name} on DTensor logits"):
            curvkern.ce_hvp(sharded, target, sharded_u, fused=backend, **kwargs)
    probabilities = torch.softmax(logits, dim=1)
    with pytest.raises(NotImplementedError, match="probability targets on DTensor logits"):
        curvkern.cross_entropy(sharded, probabilities, fused=backend)
