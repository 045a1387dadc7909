"""Backend selection scopes: ``ops.use_backends`` (auto -> a named backend) and ``ops.trusted_values``
(no host-reading value checks)."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops


def _embed_args(bad_id: int = 3):
    ids = torch.full((1, 1, 9), 7, dtype=torch.int64)
    ids[0, 0, 0] = bad_id
    return ids, torch.randn(10, 4)


def test_use_backends_turns_auto_into_the_named_backend():
    ids, table = _embed_args()
    with ops.use_backends(block_embed="cuda"):
        with pytest.raises(ops.BackendUnavailableError, match="block_embed: backend 'cuda'"):
            ops.block_embed(ids, table, q_eos=7, text_vocab=5)
        # An explicit backend wins over the scope.
        ops.block_embed(ids, table, q_eos=7, text_vocab=5, backend="torch")
    ops.block_embed(ids, table, q_eos=7, text_vocab=5)  # the scope is gone


def test_use_backends_scopes_nest_and_restore():
    ids, table = _embed_args()
    with ops.use_backends(block_embed="cuda"):
        with ops.use_backends(block_embed="torch"):
            ops.block_embed(ids, table, q_eos=7, text_vocab=5)
        with pytest.raises(ops.BackendUnavailableError):
            ops.block_embed(ids, table, q_eos=7, text_vocab=5)


@pytest.mark.parametrize(
    "choices, match",
    [
        ({"not_an_op": "torch"}, r"unknown op\(s\) \['not_an_op'\]"),
        ({"block_embed": "auto"}, "block_embed must name one of"),
        ({"block_embed": "fast"}, "block_embed must name one of"),
    ],
)
def test_use_backends_rejects_bad_choices(choices, match):
    with pytest.raises(ValueError, match=match), ops.use_backends(**choices):
        pass


def test_trusted_values_skips_only_the_value_checks():
    ids, table = _embed_args(bad_id=99)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\), got 99"):
        ops.block_embed(ids, table, q_eos=7, text_vocab=5)
    # Shapes are still checked inside the scope.
    with ops.trusted_values(), pytest.raises(ValueError, match="table must have shape"):
        ops.block_embed(ids, table[None], q_eos=7, text_vocab=5)
    with pytest.raises(ValueError, match="ids must lie in"):  # back on after the scope
        ops.block_embed(ids, table, q_eos=7, text_vocab=5)


def test_every_ops_module_imports_as_a_module_and_no_op_shadows_one():
    """``import kelix_fast.ops.<module> as m`` gives the module (the first H200 run found op functions
    bound over their own modules' names, so such an import gave the function), and every public op is
    a function defined in one of those modules."""
    import importlib
    import pkgutil
    import types

    names = [info.name for info in pkgutil.iter_modules(ops.__path__)]
    assert "codebook" in names and "selection" in names
    for name in names:
        module = importlib.import_module(f"kelix_fast.ops.{name}")
        assert isinstance(module, types.ModuleType)
        # `import kelix_fast.ops.<name> as m` binds this attribute of the package, not sys.modules'.
        assert getattr(ops, name) is module, f"kelix_fast.ops.{name} is shadowed"
    for op in ops.__all__:
        value = getattr(ops, op)
        if isinstance(value, types.FunctionType) and op not in ("resolve_backend", "use_backends"):
            assert value.__module__.rsplit(".", 1)[-1] in names and op not in names
