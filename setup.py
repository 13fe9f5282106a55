"""Builds curvkern._C, the C++/OpenMP kernels, with torch's BuildExtension.

Install with `pip install --no-build-isolation -e .` so the extension is compiled against the
torch already in the environment (the Makefile's `make venv` does this).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            name="curvkern._C",
            sources=SOURCES,
            include_dirs=[str(ROOT / "csrc")],
            # -ffp-contract=off: a product-sum is fused only where the kernel says std::fma, so the
            # kernels round like the eager reference. -fno-math-errno and -fno-trapping-math change
            # no result; they let GCC vectorize sqrt and the selects of csrc/vec.h (on AVX2 too).
            extra_compile_args=[
                "-O3",
                "-fopenmp",
                "-std=c++20",
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fno-trapping-math",
            ],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
