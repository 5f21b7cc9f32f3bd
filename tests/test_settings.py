"""Settings round-trip through plain dicts (and JSON, as reports are written and read); unknown keys are refused."""

import json

import pytest

from lunar_lens.choose.choice import ChoiceSettings
from lunar_lens.choose.probes import LocaliseSettings
from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import RunSettings
from lunar_lens.edit.layers import EditSettings
from lunar_lens.edit.refine import RefineSettings

EXAMPLES = [
    EditSettings(),
    EditSettings(coeff=6.0, positions="last", refusal="I don't know.", refine=RefineSettings(steps=0, lr=1e-3)),
    RefineSettings(steps=7),
    ChoiceSettings(coeffs=(1.0, 3.0), holdout=0.5),
    LocaliseSettings(edit=EditSettings(positions="suffix", ridge=0.0), max_prompts=8, figure_probes=True),
    RunSettings(device="cuda:1", dtype="bfloat16", device_map={"model.layers.0": 0}, force=True, progress=False),
]


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda settings: type(settings).__name__)
def test_settings_round_trip_through_json(settings):
    written = json.loads(json.dumps(settings.to_dict()))
    assert type(settings).from_dict(written) == settings


def test_an_unknown_key_is_one_line_naming_it():
    with pytest.raises(LunarError, match=r"^unknown EditSettings setting 'coef': use only ") as error:
        EditSettings.from_dict({"coef": 4.0})
    assert "\n" not in str(error.value)
    with pytest.raises(LunarError, match="unknown RefineSettings setting 'stpes'"):
        LocaliseSettings.from_dict({"edit": {"refine": {"stpes": 3}}})


def test_a_round_trip_checks_values_as_construction_does():
    with pytest.raises(LunarError, match="unknown positions 'everywhere'"):
        EditSettings.from_dict(EditSettings().to_dict() | {"positions": "everywhere"})
