import pytest

from recipe.optimal_sampling import SamplerConfig


def test_presets_match_the_design_table():
    expected = {
        "conservative": (1, 0.90, "kl_symmetry"),
        "balanced": (1, 0.95, "kl_symmetry"),
        "exploratory": (0, None, "kl_symmetry"),
    }
    for name, (force, top_p, method) in expected.items():
        cfg = SamplerConfig.preset(name)
        assert (cfg.force_teacher_tokens, cfg.teacher_top_p, cfg.alpha_method) == (force, top_p, method)
    assert SamplerConfig.preset("balanced", temperature=0.7).temperature == 0.7


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="conservative"):
        SamplerConfig.preset("aggressive")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alpha_method": "chernoff"}, "alpha_method"),
        ({"alpha_method": "fixed"}, "fixed_alpha"),
        ({"alpha_method": "fixed", "fixed_alpha": 1.2}, "fixed_alpha"),
        ({"fixed_alpha": 0.3}, "fixed_alpha"),
        ({"force_teacher_tokens": -1}, "force_teacher_tokens"),
        ({"force_teacher_tokens": 1.5}, "force_teacher_tokens"),
        ({"force_teacher_tokens": True}, "force_teacher_tokens"),
        ({"teacher_top_p": 0.0}, "teacher_top_p"),
        ({"teacher_top_p": 1.5}, "teacher_top_p"),
        ({"teacher_top_p": float("nan")}, "teacher_top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["2"]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_stop_ids_become_a_tuple_and_round_trip_through_a_dict():
    cfg = SamplerConfig(alpha_method="fixed", fixed_alpha=0.5, stop_token_ids=[3, 4])
    assert cfg.stop_token_ids == (3, 4)
    assert SamplerConfig(**cfg.to_dict()) == cfg
