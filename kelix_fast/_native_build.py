"""Whether the install builds kelix_fast._C: the one definition that setup.py and tests/build share.

setup.py runs before kelix_fast (and maybe torch) is installed, so it loads this file by path rather than
importing the package; hence the standard library only, and nothing from kelix_fast. The tests import it
as ``kelix_fast._native_build`` to expect exactly what the install decided.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_nvcc() -> str | None:
    """Path of nvcc: PATH first, then $CUDA_HOME/bin and $CUDA_PATH/bin; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(Path(home, "bin", "nvcc"), os.X_OK):
            return str(Path(home, "bin", "nvcc"))
    return None


def native_build_skipped() -> bool:
    """KELIX_FAST_NO_NATIVE set to anything but empty, 0, false or no."""
    value = os.environ.get("KELIX_FAST_NO_NATIVE", "").strip().lower()
    return value not in ("", "0", "false", "no")
