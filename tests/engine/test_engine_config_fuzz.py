"""Random bad ds_configs: every one must come back as a ConfigError naming the key path that was
broken -- never a pydantic ValidationError, a KeyError or a traceback from deep inside."""
from __future__ import annotations

import copy
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, EngineConfig, load_config
from engine.config.optim import SUPPORTED_OPTIMIZERS, SUPPORTED_SCHEDULERS

# A valid config that exercises most sections and nesting depths. Python types matter: a float
# here marks a float key (0.0, not 0), an int an integer key.
BASE: dict[str, Any] = {
    "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "steps_per_print": 10,
    "wall_clock_breakdown": False, "prescale_gradients": False, "gradient_predivide_factor": 1.0,
    "fp16": {"enabled": False, "loss_scale": 0.0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 500_000_000,
                          "stage3_prefetch_bucket_size": 50_000_000, "contiguous_gradients": True,
                          "offload_optimizer": {"device": "cpu", "pin_memory": True, "ratio": 1.0},
                          "offload_param": {"device": "cpu", "buffer_count": 5}},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                      "warmup_num_steps": 10, "total_num_steps": 100}},
    "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False, "number_checkpoints": 4},
    "checkpoint": {"tag_validation": "Warn", "load_universal": False, "parallel_write": {"pipeline_stage": False}},
    "data_types": {"grad_accum_dtype": "fp32"},
    "tensorboard": {"enabled": False, "output_path": "tb", "job_name": "run"},
    "comms_logger": {"enabled": False, "prof_ops": ["all_reduce"]},
}
FREE_TEXT = {"tensorboard.output_path", "tensorboard.job_name"}   # any string is valid there
# zero_optimization: true/false is DeepSpeed's legacy form (migrated), so a bool is not "bad" there
BOOL_OK_SECTIONS = {"zero_optimization"}


def _names(model: Any, seen: set[type] | None = None) -> set[str]:
    """Every key name the config model knows, at any depth (to keep typos from hitting a real key)."""
    seen = seen or set()
    if model in seen or not hasattr(model, "model_fields"):
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for info in model.model_fields.values():
        for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
            names |= _names(arg, seen)
    return names


KNOWN = _names(EngineConfig) | set().union(*(_names(m) for m in (*SUPPORTED_OPTIMIZERS.values(),
                                                                  *SUPPORTED_SCHEDULERS.values())))
KNOWN |= {"bfloat16", "gradient_checkpointing", "allgather_size", "cpu_offload", "cpu_offload_param",
          "cpu_offload_use_pin_memory", "stage3_gather_fp16_weights_on_model_save"}   # migrated names


def _walk(node: dict[str, Any], prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, value
        if isinstance(value, dict):
            yield from _walk(value, path)


LEAVES = [(p, v) for p, v in _walk(BASE) if not isinstance(v, dict)]
SECTIONS = [p for p, v in _walk(BASE) if isinstance(v, dict)]
DICT_NODES = [""] + SECTIONS

junk_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
                         lambda inner: st.lists(inner, min_size=1, max_size=3)
                         | st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=6), inner,
                                           min_size=1, max_size=3), max_leaves=6)


def bad_values(path: str, value: Any) -> st.SearchStrategy[Any]:
    """Values that are certainly invalid for the key at ``path`` (whose valid value is ``value``)."""
    containers = st.lists(st.integers(), min_size=1, max_size=3) | st.dictionaries(
        st.text(string.ascii_lowercase, min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
    if isinstance(value, bool):
        return st.sampled_from(["true", "yes", 1, 0, 1.0]) | containers
    if isinstance(value, int):
        return st.sampled_from(["8", True, 2.5, -1, -100, 1e-3]) | containers
    if isinstance(value, float):
        return st.sampled_from(["0.1", True, -1.0, -1e-9, float("nan"), float("inf")]) | containers
    if isinstance(value, str):
        wrong_type = st.sampled_from([1, 2.5, True]) | containers
        if path in FREE_TEXT:
            return wrong_type
        return wrong_type | st.text(string.ascii_letters + "_", min_size=1, max_size=12).filter(
            lambda s: s.lower() != value.lower() and s.lower() not in {"fp16", "bf16", "ignore", "fail", "nvme",
                                                                          "none", "adam", "sgd", "lion", "linear",
                                                                          *map(str.lower, SUPPORTED_SCHEDULERS)})
    if isinstance(value, list) and path.endswith("betas"):
        return st.sampled_from(["0.9", 0.9, [0.9], [0.9, 0.99, 0.999], [1.5, 0.9], [0.9, -0.1], [True, 0.9]])
    if isinstance(value, list):
        return st.sampled_from(["all_reduce", 3, {"op": 1}, [1], [None]])
    raise AssertionError(path)


@st.composite
def value_mutation(draw):
    path, value = draw(st.sampled_from(LEAVES))
    return ("set", path, draw(bad_values(path, value)))


@st.composite
def section_mutation(draw):
    path = draw(st.sampled_from(SECTIONS))
    options = st.sampled_from(["x", 3, 2.5, [], [{}]]) | st.lists(junk_json, min_size=1, max_size=2)
    if path not in BOOL_OK_SECTIONS:
        options |= st.booleans()
    return ("set", path, draw(options))


def _typo(key: str, draw) -> str:
    i = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(["drop", "swap", "double", "replace", "case", "dash"]))
    if kind == "drop" and len(key) > 1:
        return key[:i] + key[i + 1:]
    if kind == "swap" and i < len(key) - 1:
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    if kind == "double":
        return key[:i] + key[i] + key[i:]
    if kind == "case":
        return key[:i] + key[i].swapcase() + key[i + 1:]
    if kind == "dash" and "_" in key:
        return key.replace("_", "-", 1)
    return key[:i] + draw(st.sampled_from(string.ascii_lowercase)) + key[i + 1:]


@st.composite
def key_mutation(draw):
    node_path = draw(st.sampled_from(DICT_NODES))
    node = _get(BASE, node_path)
    key = draw(st.sampled_from(sorted(node)))
    typo = _typo(key, draw)
    if typo in KNOWN or typo == key:
        typo = key + "_x"
    return ("rename", f"{node_path}.{key}" if node_path else key, typo)


@st.composite
def garbage_key(draw):
    node_path = draw(st.sampled_from(DICT_NODES))
    key = draw(st.text(string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=12)
               .filter(lambda k: k not in KNOWN and "." not in k))
    return ("add", f"{node_path}.{key}" if node_path else key, draw(junk_json))


def _get(node: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply(config: dict[str, Any], mutation: tuple[str, str, Any]) -> list[str]:
    """Apply one mutation in place; return the key paths an error may name (first: the one it must)."""
    op, path, arg = mutation
    parent_path, _, key = path.rpartition(".")
    parent = _get(config, parent_path)
    if not isinstance(parent, dict):
        return []      # an earlier mutation replaced this section; nothing new to break
    if op == "rename":
        if key not in parent:
            return []
        parent[arg] = parent.pop(key)
        # a required key (optimizer.type, total_num_steps) is then also reported missing
        return [f"{parent_path}.{arg}" if parent_path else arg, path]
    parent[key] = arg
    return [path]


def names_path(problems: list, path: str) -> bool:
    return any(p.path == path or p.path.startswith(path + ".") or p.path.startswith(path + "[")
               for p in problems)


def test_the_base_config_is_valid():
    cfg = load_config(BASE, world_size=2)
    assert cfg.zero_optimization.offload_param.device == "cpu" and cfg.precision == "bf16"


mutations = st.one_of(value_mutation(), section_mutation(), key_mutation(), garbage_key())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(mutations, min_size=1, max_size=3))
def test_random_bad_configs_raise_a_config_error_naming_the_key_path(changes):
    config = copy.deepcopy(BASE)
    applied = [paths for paths in (apply(config, m) for m in changes) if paths]
    paths = [paths[0] for paths in applied]
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)
    problems = excinfo.value.problems
    text = str(excinfo.value)
    assert problems and "Traceback" not in text and "validation error" not in text.lower()
    named = [p for p in paths if names_path(problems, p)]
    assert named, f"none of {paths} named in:\n{text}"
    assert all(p.path in text for p in problems)
    if len(changes) == 1:   # a single mistake is reported where it was made, and only there
        allowed = applied[0]
        assert all(any(p.path == a or p.path.startswith((a + ".", a + "[")) for a in allowed) for p in problems), text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=60) | st.builds(json.dumps, junk_json))
def test_random_file_contents_either_load_or_raise_a_config_error_naming_the_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "ds_config.json"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and exc.problems
