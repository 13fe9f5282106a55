"""The constants the C++ kernels copy from the eager references, checked against them.

csrc/optim/<family>.cpp declares each constant of curvkern/optim/<family>/eager.py as
``constexpr double kCamelCase = value;`` (or ``kCamelCase[n] = {a, b}`` for a tuple), named after the
eager constant (GLOBAL_BLEND is kGlobalBlend). The C++ source is read, not the compiled library, so the
check runs without a build. Every C++ constant must equal its eager twin, and every float constant of
the eager module must have one.
"""

import re
from pathlib import Path

import pytest

from curvkern.optim.biostatis import eager as biostatis_eager
from curvkern.optim.hysterograd import eager as hysterograd_eager

ROOT = Path(__file__).resolve().parents[1]
CONSTANT = re.compile(r"constexpr double k(\w+)(?:\[\d+\])?\s*=\s*(\{[^}]*\}|[^;]+);")


def cpp_constants(source: Path) -> dict[str, float | tuple[float, ...]]:
    """{EAGER_NAME: value} of every `constexpr double k...` in `source`."""
    constants = {}
    for camel, literal in CONSTANT.findall(source.read_text()):
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()
        values = tuple(float(v) for v in literal.strip("{} ").split(","))
        constants[name] = values if literal.startswith("{") else values[0]
    return constants


def eager_constants(module) -> dict[str, float | tuple[float, ...]]:
    """The module's upper-case float and tuple-of-float constants."""
    return {
        name: value
        for name, value in vars(module).items()
        if name.isupper()
        and (
            isinstance(value, float)
            or (isinstance(value, tuple) and value and all(isinstance(v, float) for v in value))
        )
    }


@pytest.mark.parametrize(
    "source, module",
    [
        ("csrc/optim/biostatis.cpp", biostatis_eager),
        ("csrc/optim/hysterograd.cpp", hysterograd_eager),
    ],
    ids=["biostatis", "hysterograd"],
)
def test_cpp_constants_equal_the_eager_references(source, module):
    cpp, eager = cpp_constants(ROOT / source), eager_constants(module)
    assert cpp, f"no constexpr double constants found in {source}"
    assert cpp == eager, f"{source} and {module.__name__} disagree"
