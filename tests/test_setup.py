"""setup.py: an extension that a compiler linked with a static libstdc++ (it would crash on its first
error message) is detected by its ELF dependencies, rebuilt with the system compiler, or left out."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (
    "#include <stdexcept>\n#include <string>\n"
    'std::string check(int x) { if (x) throw std::runtime_error("bad " + std::to_string(x)); return "ok"; }\n'
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None, reason="ELF shared libraries built by g++"
)


def load_setup():
    spec = importlib.util.spec_from_file_location("instrument_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions only: setup() runs under __main__
    return module


def wrapper(folder: Path, name: str, static: bool) -> Path:
    """A compiler script that calls the system g++, adding -static-libstdc++ when `static`."""
    path = folder / name
    path.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@"{" -static-libstdc++" if static else ""}\n')
    path.chmod(0o755)
    return path


def test_needed_libraries_tell_a_static_libstdcxx(tmp_path):
    setup = load_setup()
    (tmp_path / "t.cpp").write_text(SOURCE)
    for static in (False, True):
        compiler = wrapper(tmp_path, f"cxx{int(static)}", static)
        subprocess.run(
            [str(compiler), "-shared", "-fPIC", "t.cpp", "-o", f"lib{int(static)}.so"], cwd=tmp_path, check=True
        )
    dynamic, static = str(tmp_path / "lib0.so"), str(tmp_path / "lib1.so")
    assert any(n.startswith("libstdc++") for n in setup.needed_libraries(dynamic))
    assert not any(n.startswith("libstdc++") for n in setup.needed_libraries(static))
    assert "libc.so.6" in setup.needed_libraries(static)
    assert setup.static_libstdcxx(static, dynamic) and not setup.static_libstdcxx(dynamic, dynamic)
    assert not setup.static_libstdcxx(static, static)  # torch itself static: nothing to be at odds with
    assert setup.needed_libraries(str(ROOT / "setup.py")) is None
    assert not setup.static_libstdcxx(str(ROOT / "setup.py"), dynamic)
    if os.path.isfile(setup.torch_library()):
        assert any(n.startswith("libstdc++") for n in setup.needed_libraries(setup.torch_library()))


BUILD = textwrap.dedent("""
    import importlib.util, sys
    from setuptools import Extension, setup
    from torch.utils.cpp_extension import BuildExtension
    spec = importlib.util.spec_from_file_location("instrument_setup", {setup!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SYSTEM_COMPILERS = tuple(sys.argv[1:])
    setup(name="tiny", ext_modules=[Extension("tiny_ext", ["t.cpp"], language="c++")],
          cmdclass={{"build_ext": module.checked_build_ext(BuildExtension)}},
          script_args=["build_ext", "--inplace"])
""")


def build(folder: Path, compiler: Path, system_compilers: list) -> subprocess.CompletedProcess:
    (folder / "t.cpp").write_text(SOURCE)
    (folder / "build_tiny.py").write_text(BUILD.format(setup=str(ROOT / "setup.py")))
    env = {**os.environ, "CXX": str(compiler), "MAX_JOBS": "1"}
    return subprocess.run(
        [sys.executable, "build_tiny.py", *map(str, system_compilers)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def built(folder: Path) -> list:
    return sorted(folder.glob("tiny_ext*.so"))


@pytest.mark.slow
def test_static_libstdcxx_build_is_redone_with_the_system_compiler(tmp_path):
    setup = load_setup()
    done = build(tmp_path, wrapper(tmp_path, "static-g++", True), [shutil.which("g++")])
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if line.startswith("seq-instrument:")]
    assert len(notices) == 1 and "links libstdc++ statically" in notices[0] and "rebuilding" in notices[0]
    [library] = built(tmp_path)
    assert not setup.static_libstdcxx(str(library), setup.torch_library())


@pytest.mark.slow
def test_without_a_dynamic_libstdcxx_compiler_the_extension_is_left_out(tmp_path):
    done = build(tmp_path, wrapper(tmp_path, "static-g++", True), [wrapper(tmp_path, "other-static-g++", True)])
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if line.startswith("seq-instrument:")]
    assert len(notices) == 2 and "installing without the native extension tiny_ext" in notices[1]
    assert built(tmp_path) == []


@pytest.mark.slow
def test_a_dynamic_build_is_kept_without_notice(tmp_path):
    done = build(tmp_path, wrapper(tmp_path, "plain-g++", False), [])
    assert done.returncode == 0, done.stderr
    assert "seq-instrument:" not in done.stderr
    assert len(built(tmp_path)) == 1
