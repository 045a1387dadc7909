"""``EngineOptions``: one validated object for the engine-wide choices, per-call overrides, and the
backend choices applied to every op call the engine makes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kelix_fast import Engine, KelixAR, KelixPipeline, ops, presets
from kelix_fast.cli import main
from kelix_fast.options import EngineOptions

PROMPT = [presets.IM_START, 872, 198, 1000, 2000, presets.IM_END, 198, presets.IM_START, 77091, 198]


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"vq": "fast"}, ValueError, r"vq must be one of \['reference', 'exact'\], got 'fast'"),
        ({"scoring": "half"}, ValueError, "scoring must be one of"),
        ({"sampler": "beam"}, ValueError, "sampler must be one of"),
        ({"cuda_graphs": 1}, TypeError, "cuda_graphs must be None or a bool"),
        ({"backends": {"conv": "torch"}}, ValueError, "backends: unknown op 'conv'"),
        (
            {"backends": {"attention": "auto"}},
            ValueError,
            r"backends\['attention'\] must be one of",
        ),
    ],
)
def test_bad_options_name_the_field(fields, error, match):
    with pytest.raises(error, match=match):
        EngineOptions(**fields)


def test_replace_validates_keeps_none_and_refuses_unknown_fields():
    options = EngineOptions(
        scoring="structured", backends={"rms_norm": "torch", "attention": "torch"}
    )
    assert options.backends == (("attention", "torch"), ("rms_norm", "torch"))  # sorted pairs
    assert options.replace(scoring=None, sampler=None) is options
    assert options.replace(scoring="full").scoring == "full"
    with pytest.raises(ValueError, match="scoring must be one of"):
        options.replace(scoring="fast")
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['steps'\]"):
        options.replace(steps=3)


def test_the_engine_takes_options_or_single_fields():
    ar = KelixAR.tiny(device="cpu", vq="exact", scoring="structured")
    assert ar.options == EngineOptions(vq="exact", scoring="structured") and ar.vq == "exact"
    given = EngineOptions(sampler="reference")
    assert KelixAR.tiny(device="cpu", options=given, vq="exact").options == given.replace(
        vq="exact"
    )
    with pytest.raises(TypeError, match="options must be an EngineOptions"):
        KelixAR(ar.model, options={"vq": "exact"})


def test_a_call_override_equals_the_same_engine_option():
    structured = KelixAR.tiny(seed=2, device="cpu", scoring="structured")
    default = KelixAR.tiny(seed=2, device="cpu")
    want = structured.generate([PROMPT], max_new_blocks=4).groups
    assert torch.equal(
        default.generate([PROMPT], max_new_blocks=4, scoring="structured").groups, want
    )
    engine = Engine(
        structured, max_batch=1, max_context=32
    )  # add_request's default is the engine's
    engine.add_request(PROMPT, max_new_blocks=4)
    got = []
    while engine.has_unfinished():
        got += [o.new_groups for o in engine.step()]
    assert torch.equal(torch.cat(got), want[0, len(PROMPT) :])


def test_backends_apply_to_every_op_call_of_the_engine(monkeypatch):
    """The forced backend runs (here triton, under its interpreter on CPU) for the engine's calls, and
    only for them."""
    ar = KelixAR.tiny(seed=2, device="cpu", backends={"rms_norm": "triton"})
    ran = []
    table = ops.norm._IMPLS
    original = table["triton"]
    recording = dataclasses.replace(original, run=lambda *a: ran.append(1) or original.run(*a))
    monkeypatch.setitem(table, "triton", recording)
    ar.generate([PROMPT], max_new_blocks=1)
    assert ran, "the engine's rms_norm calls did not run the triton backend"
    count = len(ran)
    x = torch.randn(2, 8)
    ops.rms_norm(x, torch.ones(8), eps=1e-6)  # outside the engine: auto, torch on CPU
    assert len(ran) == count


def test_the_pipeline_and_the_cli_reach_the_options(tmp_path, capsys):
    pipe = KelixPipeline.tiny(seed=1, device="cpu", options=EngineOptions(scoring="structured"))
    assert pipe.ar.options.scoring == "structured"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cpu", "--backend", "conv=torch"])
    assert exit_info.value.code == 2
    assert "--backend takes OP=BACKEND" in capsys.readouterr().err
    out = tmp_path / "demo.png"
    code = main(
        ["demo", "--device", "cpu", "--steps", "1", "--size", "64", "--blocks", "2",
         "--scoring", "structured", "--cuda-graphs", "off", "--backend", "rms_norm=torch",
         "-o", str(out)]
    )  # fmt: skip
    assert code == 0 and out.is_file()
