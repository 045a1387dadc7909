"""Triton kernels of kelix_fast, installed as kelix_fast.triton_kernels.

One op per file; imports torch and triton only, never kelix_fast.

:func:`kernels_for` gives the ops the kernel module that runs on their tensors: the compiled kernels for
CUDA tensors, and for CPU tensors a second copy of the same module whose ``@triton.jit`` functions were
decorated for Triton's interpreter (a correctness tool at milliseconds per program). Both live in one
process, so whether CPU tensors interpret no longer depends on ``TRITON_INTERPRET`` being set before the
first import, and a test of the interpreter runs the same on a machine with a GPU as on one without.
``TRITON_INTERPRET=1`` in the environment still interprets everything, CUDA tensors included.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

_PREFIX = __name__ + "."
_interpreted: dict[str, ModuleType] = {}  # kernel module name -> its interpreted copy
_lock = threading.Lock()
_launch_lock = threading.RLock()
# id(triton.language JITFunction) -> its interpreted twin (a JITFunction hashes by its compiled cache
# key, which cannot be computed while the interpreter patches triton.language).
_twins: dict[int, object] = {}


def kernels_for(name: str, *tensors: torch.Tensor) -> ModuleType:
    """The kernel module ``name`` (e.g. ``"codebook_argmin"``) for ``tensors``: compiled when they are all
    on CUDA devices (or ``TRITON_INTERPRET=1`` made the compiled copy interpreted), else interpreted."""
    if all(t.is_cuda for t in tensors):
        return importlib.import_module(_PREFIX + name)
    return interpreted(name)


def interpreted(name: str) -> ModuleType:
    """The copy of kernel module ``name`` decorated for Triton's interpreter (imported once, cached)."""
    import triton

    if triton.knobs.runtime.interpret:
        return importlib.import_module(_PREFIX + name)  # every kernel is interpreted already
    with _lock:
        if name not in _interpreted:
            _import_interpreted(name)
        return _interpreted[name]


def _import_interpreted(name: str) -> None:
    """Import ``name`` (and the sibling modules it imports) afresh with the interpreter knob on.

    Kernel modules import shared ``@triton.jit`` helpers from their siblings, so the siblings must be
    interpreted copies too: the compiled modules are set aside in ``sys.modules`` (and as attributes of
    this package) while the copy is imported, the interpreted copies made earlier are put in their
    place, and everything is restored afterwards. Under ``_lock``; the compiled modules are untouched.
    """
    import triton

    package = sys.modules[__name__]
    compiled = {key: sys.modules.pop(key) for key in list(sys.modules) if key.startswith(_PREFIX)}
    attributes = {
        key: vars(package)[key] for key in list(vars(package)) if _PREFIX + key in compiled
    }
    sys.modules.update({_PREFIX + key: module for key, module in _interpreted.items()})
    try:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            importlib.import_module(_PREFIX + name)
        for key in [key for key in sys.modules if key.startswith(_PREFIX)]:
            if key[len(_PREFIX) :] not in _interpreted:
                _interpreted[key[len(_PREFIX) :]] = _with_interpreted_stdlib(sys.modules[key])
    finally:
        for key in [key for key in sys.modules if key.startswith(_PREFIX)]:
            del sys.modules[key]
            vars(package).pop(key[len(_PREFIX) :], None)
        sys.modules.update(compiled)
        vars(package).update(attributes)


def _with_interpreted_stdlib(module: ModuleType) -> ModuleType:
    """Make every kernel launch of an interpreted ``module`` run under :func:`_interpreted_stdlib`."""
    from triton.runtime.interpreter import InterpretedFunction

    for value in vars(module).values():
        if isinstance(value, InterpretedFunction) and value.fn.__module__ == module.__name__:
            value.run = _launch_under_interpreted_stdlib(value.run)
    return module


def _launch_under_interpreted_stdlib(run: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(run)
    def launch(*args: object, **kwargs: object) -> object:
        with _interpreted_stdlib():
            return run(*args, **kwargs)

    return launch


@contextlib.contextmanager
def _interpreted_stdlib() -> Iterator[None]:
    """While an interpreted kernel runs, triton.language's own ``@triton.jit`` helpers (``tl.sum``,
    ``tl.max``, ``tl.cdiv``, ...) run as their interpreted twins, and the interpreter's scalars index
    with numpy >= 2.4 too.

    Triton decorated them when it was imported, compiled unless ``TRITON_INTERPRET=1`` was set then, and a
    compiled ``JITFunction`` refuses to be called from Python. Inside an interpreted kernel every call is
    a Python call, so for the duration of the launch ``JITFunction.__call__`` runs the
    ``InterpretedFunction`` of the same function, which is what ``TRITON_INTERPRET=1`` would have made of
    it. Compiled launches never call ``JITFunction.__call__`` (the compiler reads the function's source),
    so they are unaffected; interpreted launches are serialised by a lock.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    def call_twin(self: JITFunction, *args: object, **kwargs: object) -> object:
        if id(self) not in _twins:
            _twins[id(self)] = interpreter.InterpretedFunction(self.fn)
        return _twins[id(self)](*args, **kwargs)

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_for_numpy_2_4(tensor: type, scope: object) -> None:
        # The interpreter's scalars are 1-element arrays of ndim 1, and its __index__ is int(array),
        # which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"): every loop with a
        # run-time bound then fails (TOOLCHAIN.md trap 1; the GPU image has numpy 2.5). Same value,
        # taken with .item().
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    with _launch_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = call_twin
        interpreter._patch_lang_tensor = patch_lang_tensor_for_numpy_2_4
        try:
            yield
        finally:
            JITFunction.__call__ = original
            interpreter._patch_lang_tensor = patch_lang_tensor
