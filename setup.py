"""Build hyperkern and its compiled extension hyperkern._C.

The extension is a CUDAExtension when torch was built with CUDA and a CUDA toolkit (nvcc) is found,
or when FORCE_CUDA=1; otherwise a CppExtension with the CPU kernels only. TORCH_CUDA_ARCH_LIST is
honoured by torch.utils.cpp_extension. HYPERKERN_SKIP_EXTENSION=1 installs the pure-Python package
(the "torch" and "triton" backends still work).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    if os.environ.get("HYPERKERN_SKIP_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 but the installed torch has no CUDA support (torch.version.cuda is None); "
                           "install a CUDA build of torch to compile the CUDA kernels")
    # No -std flag: torch.utils.cpp_extension picks the C++ standard its headers need (C++20 from torch 2.14).
    cxx_flags = ["-O3", "-fopenmp", "-DHYPERKERN_OPENMP"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if use_cuda:
        ext = CUDAExtension(
            "hyperkern._C",
            cpp_sources + cuda_sources,
            define_macros=define_macros + [("HYPERKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math",
                                                           "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("hyperkern._C", cpp_sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    packages=find_packages(include=["hyperkern", "hyperkern.*"]) + ["hyperkern.kernels"],
    package_dir={"hyperkern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
