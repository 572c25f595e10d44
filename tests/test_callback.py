"""The callback module (lightning_nusam.lightning.callback and .presets): the options each
method takes, as written in its signature, checked where they are defined."""

from __future__ import annotations

import inspect

import pytest

from lightning_nusam import SharpnessAwareCallback
from lightning_nusam.lightning.presets import PRESETS
from lightning_nusam.step_options import StepOptions


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_signature_is_its_perturbation_options_then_the_common_ones(name: str) -> None:
    """Spelled out by hand in presets.py: the same names, kinds and defaults as the perturbation
    class (``model`` left out), then the keyword-only options of SharpnessAwareCallback, so an
    option added to a perturbation class without its preset fails here."""
    preset = PRESETS[name]
    method = [p for p in inspect.signature(preset.perturbation_class).parameters.values()
              if p.name != "model"]
    common = [p for p in inspect.signature(SharpnessAwareCallback.__init__).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    shown = list(inspect.signature(preset).parameters.values())
    assert [(p.name, p.default) for p in shown] == [(p.name, p.default) for p in method + common]
    assert [p.kind for p in shown[:len(method)]] == [p.kind for p in method]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in shown[len(method):])
    assert "Args:" in preset.__init__.__doc__ and "start_fraction" in preset.__init__.__doc__


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_passes_every_option_to_its_perturbation_and_its_step(name: str) -> None:
    preset = PRESETS[name]
    callback = preset(rho=0.3, batchnorm_update="both", resync_every=7)
    assert callback.rho == 0.3 and callback.perturbation_options["rho"] == 0.3
    assert callback.step_options == StepOptions(batchnorm_update="both", resync_every=7)
    with pytest.raises(TypeError, match="unexpected keyword"):
        preset(rhoo=0.1)
