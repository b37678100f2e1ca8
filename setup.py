"""Builds the optional native extension `instrument._C`; all metadata lives in pyproject.toml.

    $ pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"

The extension is built only when torch is importable here (so never inside pip's isolated build
environment), a C++ compiler exists and INSTRUMENT_NO_EXT is not "1"; otherwise the package installs as
pure Python and `instrument.kernels` uses its PyTorch fallback.

A compiler that links libstdc++ statically (a wrapper adding `-static-libstdc++`) builds an extension
that crashes the first time it formats an error message, its copy of the C++ runtime being at odds
with torch's. After the build, an extension that does not load libstdc++ dynamically while torch does
is rebuilt with the system compiler, or else left out; either way with a one-line notice.
"""

import glob
import os
import shlex
import shutil
import struct
import sys

from setuptools import setup

SYSTEM_COMPILERS = ("/usr/bin/g++", "/usr/bin/c++", "/usr/bin/clang++")


def notice(message: str) -> None:
    print(f"seq-instrument: {message}", file=sys.stderr)


def needed_libraries(path: str):
    """The DT_NEEDED entries of ELF shared object `path` (`["libstdc++.so.6", "libc.so.6", ...]`), or
    None when it is no ELF file or has no dynamic section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
        section, entry = order + "IIQQQQIIQQ", order + "qQ"
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x2E)
        section, entry = order + "IIIIIIIIII", order + "iI"
    sections = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strings = sections[link][4]
        names = []
        for at in range(offset, offset + size, struct.calcsize(entry)):
            tag, value = struct.unpack_from(entry, data, at)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                names.append(data[start : data.index(b"\0", start)].decode())
        return names
    return None


def _loads_libstdcxx(path: str):
    needed = needed_libraries(path)
    return None if needed is None else any(name.startswith("libstdc++") for name in needed)


def static_libstdcxx(extension_path: str, reference_path: str) -> bool:
    """Whether the built extension lacks the dynamic libstdc++ that `reference_path` (torch's libc10)
    loads: then it carries a static copy of the C++ runtime. False when either is no ELF file."""
    return _loads_libstdcxx(extension_path) is False and _loads_libstdcxx(reference_path) is True


def torch_library() -> str:
    import torch

    return os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")


def system_compiler(current: str):
    """A system C++ compiler other than `current` (by real path), or None."""
    used = os.path.realpath(shutil.which(current) or current)
    for candidate in SYSTEM_COMPILERS:
        if os.path.isfile(candidate) and os.path.realpath(candidate) != used:
            return candidate
    return None


def checked_build_ext(base, reference=torch_library):
    """`base` (a setuptools build_ext class) whose extensions are rebuilt with a system compiler when the
    compiler linked libstdc++ statically into them (see `static_libstdcxx`), and are left out (as
    optional extensions that failed) when that does not help. `reference()`: a library of torch's."""
    from setuptools.errors import CompileError

    class CheckedBuildExt(base):
        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            if not (os.path.isfile(path) and static_libstdcxx(path, reference())):
                return
            compiler = shlex.split(os.environ.get("CXX") or "c++")[0]
            fallback = system_compiler(compiler)
            os.remove(path)
            if fallback is not None:
                notice(
                    f"{compiler} links libstdc++ statically, which makes {ext.name} crash on its first error "
                    f"message; rebuilding it with {fallback}"
                )
                os.environ["CXX"] = fallback  # the compile step (torch's ninja build) reads CXX
                self.compiler.set_executable("compiler_cxx", fallback)  # the link step uses compiler_cxx
                self.force = True
                super().build_extension(ext)
                if not static_libstdcxx(path, reference()):
                    return
                os.remove(path)
            notice(
                f"installing without the native extension {ext.name}: no C++ compiler here links libstdc++ "
                "dynamically (set CXX to one that does)"
            )
            ext.optional = True  # setuptools then goes on without it
            raise CompileError(f"{ext.name} would link libstdc++ statically")

    return CheckedBuildExt


def native_extension():
    """(extension, None), or (None, why not) when the pure-Python package is installed."""
    if os.environ.get("INSTRUMENT_NO_EXT") == "1":
        return None, "INSTRUMENT_NO_EXT=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # a missing or broken torch must not break the install
        return None, f"torch is not importable in the build environment ({type(error).__name__}: {error})"
    compiler = shlex.split(os.environ.get("CXX") or "c++")[0]
    if not shutil.which(compiler):
        return None, f"no C++ compiler ({compiler!r} not found)"

    cxx = ["-O3", "-ffp-contract=off"]  # no FMA contraction: results must match the PyTorch fallback bit for bit
    link = []
    if sys.platform.startswith("linux") and torch._C.has_openmp:
        # at::parallel_for runs serially unless the extension itself is compiled with OpenMP (ATen/ParallelOpenMP.h)
        cxx.append("-fopenmp")
        link.append("-fopenmp")

    sources = sorted(glob.glob("csrc/*.cpp"))  # an op is one .cpp (CPU) plus, for CUDA, one .cu
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        extension = cpp_extension.CUDAExtension(
            "instrument._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        extension = cpp_extension.CppExtension("instrument._C", sources, extra_compile_args=cxx, extra_link_args=link)
    return extension, None


if __name__ == "__main__":  # as pip and setuptools run it; tests import the functions above
    extension, why_not = native_extension()
    if extension is None:
        notice(f"installing without the native extension instrument._C: {why_not}")
        setup()
    else:
        from torch.utils.cpp_extension import BuildExtension

        setup(ext_modules=[extension], cmdclass={"build_ext": checked_build_ext(BuildExtension)})
