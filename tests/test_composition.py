"""The model-string grammar, the `composition` body field, canonical specs and their keys,
and skill-name validation."""

from __future__ import annotations

import math
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import merging
from server.composition import (
    canonical_spec,
    is_valid_name,
    parse_model_string,
    spec_from_model_string,
)
from server.errors import LoramixError
from server.protocol import CompositionRequest
from server.serving.compositions import composition_input
from server.skills import SkillRegistry


def spec(model: str, default_method: str = "cat"):
    return spec_from_model_string(model, default_method=default_method)


def test_single_skill_has_weight_one():
    assert spec("math").skills == (("math", 1.0),)


def test_plain_sum_gives_equal_weights_summing_to_one():
    composed = spec("math+code+poetry")
    assert [name for name, _ in composed.skills] == ["code", "math", "poetry"]
    assert all(weight == pytest.approx(1 / 3) for _, weight in composed.skills)
    assert math.fsum(composed.weights) == pytest.approx(1.0)


def test_explicit_weights_are_used_as_given():
    composed = spec("math*0.7+code*1.5")
    assert dict(composed.skills) == {"math": 0.7, "code": 1.5}


def test_method_and_options_and_rank_from_the_string():
    composed = spec("math+code@lego(seed=3,max_iter=5,rank=4)")
    assert composed.method == "lego"
    assert dict(composed.options)["seed"] == 3
    assert dict(composed.options)["max_iter"] == 5
    assert composed.rank == 4


def test_default_method_applies_when_none_named():
    assert spec("math+code", default_method="svd").method == "svd"


def test_options_are_normalized_with_defaults():
    assert spec("math+code@lego") == spec("math+code@lego(seed=0)")


def test_equivalent_strings_give_the_same_spec_and_key():
    digests = {"math": "d1", "code": "d2"}
    forms = ["math+code", "code+math", "code*0.5+math*0.5", "math*0.5+code*0.5@cat"]
    keys = {spec(form).key(digests) for form in forms}
    assert len(keys) == 1


def test_key_changes_with_weights_method_digest_and_algorithm(monkeypatch):
    digests = {"math": "d1", "code": "d2"}
    base = spec("math+code").key(digests)
    assert spec("math*0.6+code*0.4").key(digests) != base
    assert spec("math+code@svd").key(digests) != base
    assert spec("math+code").key({"math": "d1", "code": "changed"}) != base
    monkeypatch.setattr(merging, "MERGE_ALGORITHM_VERSION", merging.MERGE_ALGORITHM_VERSION + "-next")
    assert spec("math+code").key(digests) != base


def test_body_field_mapping_and_list_forms_are_the_same_spec():
    as_map = CompositionRequest(skills={"math": 0.7, "code": 0.3}, method="svd", rank=4)
    as_list = CompositionRequest(
        skills=[{"name": "code", "weight": 0.3}, {"name": "math", "weight": 0.7}], method="svd", rank=4
    )
    assert canonical_spec(composition_input(as_map), default_method="cat") == canonical_spec(composition_input(as_list), default_method="cat")
    assert canonical_spec(composition_input(as_map), default_method="cat") == spec("math*0.7+code*0.3@svd(rank=4)")


@given(
    names=st.lists(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), min_size=1, max_size=4, unique=True),
    data=st.data(),
)
def test_model_string_round_trips(names, data):
    weights = [
        data.draw(st.floats(min_value=-4, max_value=4, allow_nan=False).filter(lambda w: w != 0)) for _ in names
    ]
    method = data.draw(st.sampled_from(["cat", "svd", "lego", "ties"]))
    request = CompositionRequest(skills=dict(zip(names, weights)), method=method)
    original = canonical_spec(composition_input(request), default_method="cat")
    assert spec(original.model_string()) == original


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("math+", "not a valid skill name"),
        ("math++code", "not a valid skill name"),
        ("math*abc", "not a number"),
        ("math*0+code*1", "non-zero"),
        ("math*inf", "finite"),
        ("math*0.5+code", "every skill or for none"),
        ("math+math", "more than once"),
        ("math@", "Malformed method"),
        ("math@lego@svd", "more than one"),
        ("math@lego(k)", "key=value"),
        ("math@lego(seed=1,seed=2)", "twice"),
        ("math+code@nosuch", "unknown merge method"),
        ("math+code@lego(bogus=1)", "bogus"),
        ("math + code", "whitespace"),
        ("math@svd(rank=0)", "positive integer"),
    ],
)
def test_malformed_strings_are_invalid_composition_on_model(model, fragment):
    with pytest.raises(LoramixError) as caught:
        spec(model)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_composition"
    assert caught.value.param == "model"
    assert fragment in caught.value.message


def test_bad_option_in_body_names_the_option():
    request = CompositionRequest(skills={"math": 1.0}, method="lego", options={"max_iter": 0})
    with pytest.raises(LoramixError) as caught:
        canonical_spec(composition_input(request), default_method="cat")
    assert caught.value.code == "invalid_composition"
    assert caught.value.param == "composition.options.max_iter"


def test_unknown_method_in_body_names_the_method():
    with pytest.raises(LoramixError) as caught:
        canonical_spec(composition_input(CompositionRequest(skills={"math": 1.0}, method="nosuch")), default_method="cat")
    assert caught.value.param == "composition.method"


@pytest.mark.parametrize(
    "body",
    [
        {"skills": {"math": 1.0}, "extra": 1},
        {"skills": [{"name": "math", "weight": 1.0, "scale": 2}]},
        {"skills": {"math": 0.0}},
        {"skills": {"math": float("nan")}},
        {"skills": {}},
        {"skills": {"math": 1.0}, "rank": 0},
    ],
)
def test_body_field_is_strict(body):
    with pytest.raises(ValidationError):
        CompositionRequest.model_validate(body)


def test_parse_gives_the_body_structure():
    parsed = parse_model_string("math*0.25+code*0.75@svd(rank=2)")
    assert [(s.name, s.weight) for s in parsed.skills] == [("math", 0.25), ("code", 0.75)]
    assert parsed.method == "svd" and parsed.rank == 2


@pytest.mark.parametrize("name", ["math", "code-v2", "llama3.1_math", "A1"])
def test_valid_skill_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "../math", "a/b", "a\\b", ".hidden", "-x", "x y", "m+c", "m*2", "m@x"])
def test_invalid_skill_names(name):
    assert not is_valid_name(name)


# ---------------------------------------------------------------- skill registry


def test_registry_finds_demo_skills_with_stable_digests(skills_dir):
    registry = SkillRegistry(skills_dir)
    skills = registry.scan()
    assert {"math", "code", "poetry", "lookup"} <= set(skills)
    assert skills["math"].digest == merging.adapter_digest(skills_dir / "math")
    assert skills["math"].digest != skills["code"].digest
    assert registry.scan()["math"] is skills["math"]  # unchanged adapters are not reloaded


def test_registry_rejects_unknown_and_traversal_names(skills_dir):
    registry = SkillRegistry(skills_dir)
    registry.scan()
    for name in ["nosuch", "../skills", "..", "math/../code"]:
        with pytest.raises(LoramixError) as caught:
            registry.get(name)
        assert caught.value.status == 404
        assert caught.value.code == "model_not_found"


def test_broken_adapter_is_reported_without_paths(skills_dir, tmp_path):
    root = tmp_path / "skills"
    shutil.copytree(skills_dir / "math", root / "good")
    shutil.copytree(skills_dir / "math", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (root / "bad name!").mkdir()
    registry = SkillRegistry(root)
    assert set(registry.scan()) == {"good"}
    with pytest.raises(LoramixError) as caught:
        registry.get("broken")
    assert caught.value.status == 400
    assert caught.value.code == "invalid_adapter"
    assert str(tmp_path) not in caught.value.message and "/" not in caught.value.message


def test_registry_notices_added_and_removed_skills(skills_dir, tmp_path):
    root = tmp_path / "skills"
    shutil.copytree(skills_dir / "math", root / "math")
    registry = SkillRegistry(root)
    registry.scan()
    assert not registry.is_stale()
    shutil.copytree(skills_dir / "code", root / "code")
    assert registry.is_stale()
    assert set(registry.scan()) == {"math", "code"}
    shutil.rmtree(root / "math")
    assert registry.is_stale()
    assert set(registry.scan()) == {"code"}


# ---------------------------------------------------------------- per-module weights


def _body(skills, module_weights):
    return composition_input(CompositionRequest(skills=skills, method="cat", module_weights=module_weights))


def test_module_weights_follow_the_canonical_skill_order():
    given_order = canonical_spec(_body({"math": 0.5, "code": 0.5}, {"m.q": [0.9, 0.1]}), default_method="cat")
    sorted_order = canonical_spec(_body({"code": 0.5, "math": 0.5}, {"m.q": [0.1, 0.9]}), default_method="cat")
    assert given_order == sorted_order
    assert given_order.module_weights == (("m.q", (0.1, 0.9)),)  # code first, then math


def test_module_weights_change_the_key_and_plain_keys_stay_as_they_were():
    digests = {"code": "c" * 64, "math": "m" * 64}
    plain = spec("math+code")
    weighted = canonical_spec(_body({"math": 0.5, "code": 0.5}, {"m.q": [0.9, 0.1]}), default_method="cat")
    assert "module_weights" not in plain.canonical_json()
    assert plain.key(digests) != weighted.key(digests)
    assert weighted.model_string().endswith(f"@cat(module_weights={weighted.module_weights_digest()})")


@pytest.mark.parametrize("rows, fragment", [({"m.q": [1.0]}, "1 weights for 2 skills"),
                                            ({"m.q": [1.0, math.inf]}, "finite")])
def test_bad_module_weights_are_invalid_composition(rows, fragment):
    with pytest.raises(LoramixError) as info:
        canonical_spec(_body({"math": 0.5, "code": 0.5}, rows), default_method="cat")
    assert info.value.code == "invalid_composition" and fragment in info.value.message
    assert info.value.param == "composition.module_weights"


def test_module_weights_cannot_come_in_a_model_string():
    weighted = canonical_spec(_body({"math": 0.5, "code": 0.5}, {"m.q": [0.9, 0.1]}), default_method="cat")
    with pytest.raises(LoramixError) as info:
        spec(weighted.model_string())
    assert info.value.param == "model" and "composition` field" in info.value.message


def test_named_compositions_round_trip_and_see_other_writers(tmp_path):
    from server.named import NamedCompositions

    weighted = canonical_spec(_body({"math": 0.5, "code": 0.5}, {"m.q": [0.9, 0.1]}), default_method="cat")
    server_side, tool_side = NamedCompositions(tmp_path), NamedCompositions(tmp_path)
    assert server_side.get("tuned") is None
    tool_side.put("tuned", weighted)  # e.g. `loramix tune-cat` while the server runs
    assert server_side.get("tuned") == weighted
    assert server_side.names() == ["tuned"]
    assert server_side.delete("tuned") and tool_side.get("tuned") is None
