"""Install kelix_fast; build the native library with CMake when nvcc is available.

- nvcc found (PATH, then $CUDA_HOME/bin or $CUDA_PATH/bin) and KELIX_FAST_NO_NATIVE unset:
  CMakeLists.txt builds kelix_fast/_C*.so and kelix_fast/libkelix_fast_kernels.so (side by side,
  _C finds the library through RPATH $ORIGIN). A failing native build fails the install.
- otherwise: the pure-Python package; the "cuda" backend of the ops is then unavailable.

Environment (read here only, at install time): KELIX_FAST_NO_NATIVE=1 skips the native build;
CMAKE_ARGS adds CMake arguments (e.g. -DCMAKE_CUDA_ARCHITECTURES=90a;100a).
`pip install -e .` builds in place, so `import kelix_fast._C` works from the source tree.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNELS_LIBRARY = "libkelix_fast_kernels.so"

_log = logging.getLogger("kelix_fast.setup")
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("kelix_fast setup: %(message)s"))
_log.addHandler(_handler)
_log.setLevel(logging.INFO)
_log.propagate = False


def _load_native_build() -> ModuleType:
    """kelix_fast/_native_build.py (find_nvcc, native_build_skipped), shared with tests/build.

    Loaded by path: importing ``kelix_fast._native_build`` would run kelix_fast/__init__.py, which
    imports torch, and the build environment need not have torch (nor kelix_fast on sys.path).
    """
    path = ROOT / "kelix_fast" / "_native_build.py"
    spec = importlib.util.spec_from_file_location("_kelix_fast_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CMakeExtension(Extension):
    """The whole CMake project, named after the Python module it yields (kelix_fast._C)."""

    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt, writing _C and libkelix_fast_kernels.so where setuptools wants _C.

    setuptools builds into build/lib* and, for `pip install -e .` (inplace), copies the
    extension back into the source tree; copy_extensions_to_source copies the library with it.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "kelix_fast: nvcc was found but cmake is not on PATH; install cmake (>= 3.24) "
                "or set KELIX_FAST_NO_NATIVE=1 to install without kelix_fast._C"
            )
        module_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        output_dir = module_path.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        config = "Debug" if self.debug else "Release"
        configure = [
            cmake,
            "-S",
            str(ext.source_dir),
            "-B",
            str(build_dir),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={output_dir}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        # The generator of an existing build folder cannot change; pick Ninja only for a new one.
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = str(self.parallel or os.cpu_count() or 1)
        _log.info("configuring: %s", shlex.join(configure))
        subprocess.run(configure, check=True)
        build = [cmake, "--build", str(build_dir), "--config", config, "-j", jobs]
        subprocess.run(build, check=True)

        for built in (module_path, output_dir / KERNELS_LIBRARY):
            if not built.exists():
                raise RuntimeError(f"kelix_fast: the CMake build did not produce {built}")
        _log.info("built %s and %s in %s", module_path.name, KERNELS_LIBRARY, output_dir)

    def _library_copies(self) -> list[tuple[str, str]]:
        """(built, in-place) paths of libkelix_fast_kernels.so, which setuptools does not know."""
        build_py = self.get_finalized_command("build_py")
        copies = []
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                module_file = Path(self.get_ext_filename(self.get_ext_fullname(ext.name)))
                built = Path(self.build_lib, module_file.parent, KERNELS_LIBRARY)
                package = ext.name.rpartition(".")[0]
                inplace = Path(build_py.get_package_dir(package), KERNELS_LIBRARY)
                copies.append((str(built), str(inplace)))
        return copies

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for built, inplace in self._library_copies():
            self.copy_file(built, inplace, level=self.verbose)

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update(self._library_copies())
        return mapping

    def get_outputs(self) -> list[str]:
        if self.inplace:
            return super().get_outputs()  # the keys of get_output_mapping
        return super().get_outputs() + [built for built, _ in self._library_copies()]


def native_extensions() -> list[Extension]:
    if _NATIVE_BUILD.native_build_skipped():
        _log.info("KELIX_FAST_NO_NATIVE is set: installing the pure-Python package, no _C")
        return []
    if NVCC is None:
        _log.info(
            "nvcc not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin): installing the pure-Python "
            "package; kelix_fast._C and the 'cuda' op backend will be unavailable"
        )
        return []
    _log.info("nvcc found at %s: building kelix_fast._C and %s with CMake", NVCC, KERNELS_LIBRARY)
    return [CMakeExtension("kelix_fast._C", ROOT)]


_NATIVE_BUILD = _load_native_build()
NVCC = _NATIVE_BUILD.find_nvcc()

setup(
    # triton_kernels/ is installed only as kelix_fast.triton_kernels: a top-level module of that
    # name belongs to another project (ARCHITECTURE.md).
    packages=find_packages(include=["kelix_fast", "kelix_fast.*"])
    + ["kelix_fast.triton_kernels"]
    + [f"kelix_fast.triton_kernels.{p}" for p in find_packages(where="triton_kernels")],
    package_dir={"kelix_fast.triton_kernels": "triton_kernels"},
    package_data={"kelix_fast": ["py.typed"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
