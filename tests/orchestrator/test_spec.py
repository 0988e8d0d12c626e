"""Job specs: what users write, what orch understands, and the errors for what it does not."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from orchestrator.errors import UserError
from orchestrator.spec import JobSpec, load_spec, spec_from_dict
from tests.shared_env import REPO


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_loads(example) -> None:
    spec = load_spec(example)
    assert spec.name and spec.world_size >= 1
    if spec.ds_config is not None:
        assert spec.ds_config_dict()


def test_elastic_range_and_fixed_nodes() -> None:
    spec = spec_from_dict({"name": "e", "nodes": "1:3", "procs_per_node": 2})
    assert spec.nodes.elastic and (spec.nodes.min, spec.nodes.max) == (1, 3) and spec.world_size == 6
    assert not spec_from_dict({"name": "f", "nodes": 2}).nodes.elastic


def test_unquoted_range_in_yaml_is_not_sexagesimal(tmp_path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: e\nnodes: 1:3\n")  # YAML 1.1 would read 63
    assert str(load_spec(p).nodes) == "1:3"


def test_set_overrides_parse_values_like_yaml(tmp_path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: e\n")
    spec = load_spec(p, ["nodes=2:4", "procs_per_node=8", "slurm.exclusive=true", "env.SEED=7",
                         "args=[--model, tiny]"])
    assert str(spec.nodes) == "2:4" and spec.procs_per_node == 8 and spec.slurm.exclusive
    assert spec.env == {"SEED": "7"} and spec.args == ["--model", "tiny"]


def test_ds_config_path_is_relative_to_the_spec_file(tmp_path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ds.json").write_text('{"train_batch_size": 4}')
    p = tmp_path / "job.yaml"
    p.write_text("name: e\nds_config: cfg/ds.json\n")
    assert load_spec(p).ds_config_dict() == {"train_batch_size": 4}


def test_missing_or_broken_ds_config_is_named(tmp_path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: e\nds_config: nope.json\n")
    with pytest.raises(UserError, match="nope.json not found"):
        load_spec(p).ds_config_dict()
    (tmp_path / "bad.json").write_text('{"a": 1,,}')
    p.write_text("name: e\nds_config: bad.json\n")
    with pytest.raises(UserError, match=r"bad.json:1:\d+: invalid JSON"):
        load_spec(p).ds_config_dict()


def test_elastic_without_restarts_is_refused() -> None:
    with pytest.raises(UserError, match="max_restarts"):
        spec_from_dict({"name": "e", "nodes": "1:2", "max_restarts": 0})


# -- fuzz: any malformed spec gives a UserError that names a key, never another exception --------
FIELDS = sorted(n for n, f in JobSpec.model_fields.items() if not f.exclude)
junk = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
section_keys = {"slurm": ["partition", "time", "exclusive", "sbatch_options", "setup", "cpus_per_task"],
                "kubernetes": ["image", "resources", "tolerations", "node_selector", "image_pull_policy"],
                "checkpoint": ["dir", "every_steps", "keep"]}


@st.composite
def bad_specs(draw):
    spec = {"name": "ok-name", "nodes": 2}
    kind = draw(st.sampled_from(["typo", "junk_value", "section_junk", "bad_name", "bad_nodes"]))
    if kind == "typo":
        key = draw(st.sampled_from(FIELDS))
        spec[key[:-1] + draw(st.sampled_from("xqz_")) if len(key) > 2 else key + "x"] = draw(junk)
        expected = None
    elif kind == "junk_value":
        key = draw(st.sampled_from(["nodes", "procs_per_node", "gpus_per_node", "args", "env", "max_restarts",
                                    "checkpoint", "slurm", "kubernetes", "rdzv_port"]))
        spec[key] = draw(junk.filter(lambda v: v is not None and not isinstance(v, dict)))
        expected = key
    elif kind == "section_junk":
        section = draw(st.sampled_from(sorted(section_keys)))
        key = draw(st.sampled_from(section_keys[section]))
        spec[section] = {key: draw(st.lists(st.integers(), min_size=1) | st.dictionaries(st.integers().map(str), st.none(), min_size=1)), key + "zz": 1}
        expected = section
    elif kind == "bad_name":
        spec["name"] = draw(st.text(min_size=1).filter(lambda s: not s.isascii() or not s.islower() or " " in s))
        expected = "name"
    else:
        spec["nodes"] = draw(st.sampled_from(["0", "3:1", "a:b", "1:", ":2", "-1", "1.5"]) | st.just(0))
        expected = "nodes"
    return spec, expected


@settings(max_examples=600, deadline=None)
@given(case=bad_specs())
def test_any_bad_spec_gives_a_clean_error_naming_the_field(case) -> None:
    spec, expected = case
    try:
        spec_from_dict(spec, source="job.yaml")
    except UserError as exc:
        message = str(exc)
        assert message.startswith("job.yaml: ")
        if expected:
            assert f": {expected}" in message, message
        return
    # a few drawn values happen to be valid (e.g. args: [] ); those must really be valid
    assert spec.get("name") == "ok-name"
