"""Builds the Python extension qwix_torch._C from csrc/ (and cuda/ when CUDA is usable)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _use_cuda():
    import torch

    if os.environ.get("QWIX_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


sources = _sources("csrc/**/*.cpp")
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
if _use_cuda():
    sources += _sources("cuda/**/*.cu")
    ext = cpp_extension.CUDAExtension(
        "qwix_torch._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc"), ROOT],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = cpp_extension.CppExtension(
        "qwix_torch._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=cxx_flags,
        extra_link_args=["-fopenmp"],
    )

setup(
    name="qwix_torch",
    version="0.1.0",
    description="Quantization-aware training for PyTorch with Qwix's rules-based workflow",
    package_dir={"": "python"},
    packages=find_packages("python"),
    # QWIX_NO_EXT=1: install the package only (the Makefile builds the extension in place first).
    ext_modules=[] if os.environ.get("QWIX_NO_EXT") == "1" else [ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "tqdm"],
    python_requires=">=3.10",
)
