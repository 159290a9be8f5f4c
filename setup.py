"""Build script: the pure-Python package, plus the optional CUDA extension ``dxr._C``.

The extension is a standalone pybind11 module built by CMake from ``csrc/`` (it takes raw device
pointers and never links PyTorch, so one build serves every torch version). ``DXR_BUILD_CUDA``:
``auto`` (default) builds it when nvcc and ``CMakeLists.txt`` are present and warns on failure,
``1`` requires it (GPU machines), ``0`` skips it. ``DXR_CUDA_ARCHS`` sets the CMake architectures
(default ``80-real;89-real;90a-real;80-virtual``); ``DXR_PTXAS_VERBOSE=1`` prints ptxas' register and spill
report of every kernel.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        mode = os.environ.get("DXR_BUILD_CUDA", "auto").lower()
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if mode in ("1", "required", "on"):
                raise
            warnings.warn(f"dxr: CUDA extension not built ({err}); installing the pure-Python package")

    def _cmake_build(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / f"cmake-{ext.name}"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DXR_CUDA_ARCHS", "80-real;89-real;90a-real;80-virtual")
        configure = [
            "cmake", "--fresh", "-S", str(ext.source_dir), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDXR_PTXAS_VERBOSE={'ON' if os.environ.get('DXR_PTXAS_VERBOSE') == '1' else 'OFF'}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        try:  # the pybind11 of this (possibly isolated) build environment
            import pybind11

            configure.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


def extensions():
    mode = os.environ.get("DXR_BUILD_CUDA", "auto").lower()
    if mode in ("0", "off", "no"):
        return []
    has_sources = (ROOT / "CMakeLists.txt").exists()
    has_tools = shutil.which("cmake") is not None and shutil.which("nvcc") is not None
    if mode in ("1", "required", "on") and not (has_sources and has_tools):
        raise RuntimeError("DXR_BUILD_CUDA=1 but CMakeLists.txt, cmake or nvcc is missing")
    return [CMakeExtension("dxr._C", ROOT)] if has_sources and has_tools else []


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
