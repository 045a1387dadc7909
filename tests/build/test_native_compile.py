"""Every CUDA source in csrc/ compiles for Hopper (sm_90a); the built kelix_fast._C works.

Runs on the CPU machines: nvcc compiles for sm_90a without a GPU (TOOLCHAIN.md). Without nvcc the
compile tests skip locally but fail under CI (CI=true), where a missing compiler is a broken image.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kelix_fast._native_build import find_nvcc, native_build_skipped

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
HEADER = CSRC / "include" / "kelix_fast" / "kernels.h"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
# -gencode, not -arch=sm_90a: the latter adds a plain sm_90 pass that rejects wgmma/setmaxnreg.
HOPPER = "-gencode=arch=compute_90a,code=sm_90a"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        reason = "nvcc not found on PATH, in $CUDA_HOME/bin or $CUDA_PATH/bin"
        if _on_ci():
            pytest.fail(f"{reason}: CI must compile every csrc/*.cu for sm_90a")
        pytest.skip(reason)
    return nvcc


def test_csrc_has_cuda_sources() -> None:
    # Guards the parametrization below, which would otherwise pass by collecting nothing.
    assert CUDA_SOURCES, f"no .cu files in {CSRC}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles_for_sm90a(source: Path, tmp_path: Path) -> None:
    nvcc = _require_nvcc()
    command = [
        nvcc,
        HOPPER,
        "-std=c++17",
        "-Xcompiler=-Wall,-Wextra",
        "-I",
        str(CSRC / "include"),
        "-c",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(REPO)} (exit {result.returncode}):\n"
        f"{' '.join(command)}\n{result.stdout}{result.stderr}"
    )
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


def _header_api_version() -> int:
    match = re.search(r"^#define KF_API_VERSION (\d+)$", HEADER.read_text(), re.MULTILINE)
    assert match, f"{HEADER.relative_to(REPO)} must define KF_API_VERSION"
    return int(match.group(1))


@pytest.fixture(scope="module")
def native_module():
    """kelix_fast._C, or a skip saying why it is absent (a fail under CI when nvcc is present)."""
    try:
        return importlib.import_module("kelix_fast._C")
    except ImportError as error:
        reason = f"kelix_fast._C is not importable ({error})"
        if _on_ci() and not native_build_skipped() and find_nvcc() is not None:
            pytest.fail(f"{reason}, although nvcc is present: setup.py should have built it")
        pytest.skip(reason)


def test_native_api_version_matches_header(native_module) -> None:
    assert native_module.api_version() == _header_api_version()


def test_native_status_string(native_module) -> None:
    assert native_module.status_string(0) == "ok"
    assert native_module.status_string(1) == "invalid argument"
    assert native_module.status_string(2) == "unsupported"
    assert native_module.status_string(3) == "CUDA error"
    assert native_module.status_string(99) == "unknown status"


def test_native_device_count_returns_or_raises(native_module) -> None:
    # On the CPU machines the CUDA runtime finds no driver: error 35, raised, never a crash or exit.
    try:
        count = native_module.device_count()
    except RuntimeError as error:
        assert re.fullmatch(r"kf_device_count: CUDA error \d+ \(.+\)", str(error)), str(error)
    else:
        assert isinstance(count, int) and count >= 0


def test_c_examples_build_with_cmake(tmp_path: Path) -> None:
    """The embedder examples (csrc/examples/*.c) compile and link against the C API through CMake."""
    nvcc = _require_nvcc()
    cmake = shutil.which("cmake")
    if cmake is None:
        if _on_ci():
            pytest.fail("cmake not on PATH: CI must build the C examples")
        pytest.skip("cmake not on PATH")
    build = tmp_path / "build"
    configure = [
        cmake,
        "-S",
        str(REPO),
        "-B",
        str(build),
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        "-DKELIX_FAST_BUILD_PYTHON=OFF",
        "-DKELIX_FAST_BUILD_EXAMPLES=ON",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for command in (configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, (
            f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    examples = sorted((CSRC / "examples").glob("*.c"))
    assert examples, "no C examples in csrc/examples"
    for name in ("kf_example_device_info", "kf_example_codebook_argmin"):
        assert (build / name).is_file(), f"CMake did not build {name}"
