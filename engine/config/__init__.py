"""The ds_config: DeepSpeed's keys with DeepSpeed's meaning, validated strictly; never imports torch.

``orch check`` and the engine both read configs through here, so importing this package must
stay cheap (pydantic, no torch). One module per job:

* model.py: ``EngineConfig``, the validated top level; sections.py and optim.py its sections;
* load.py: ``load_config`` (read, migrate, ``"auto"``, validate, batch rule);
* source.py: reading a config and migrating deprecated keys; batch.py: the batch-size rule;
* features.py: DeepSpeed features the engine refuses (they would change results) or ignores;
* types.py: the field types and the ``Section`` base; errors.py: ``ConfigError`` and its messages.
"""
from __future__ import annotations

from .batch import BatchSizes
from .errors import ConfigError, ConfigProblem
from .features import IgnoredFeature
from .load import ConfigLenientWarning, load_config
from .model import EngineConfig
from .source import ConfigDeprecationWarning

__all__ = [
    "BatchSizes", "ConfigDeprecationWarning", "ConfigError", "ConfigLenientWarning", "ConfigProblem", "EngineConfig",
    "IgnoredFeature",
    "load_config",
]
