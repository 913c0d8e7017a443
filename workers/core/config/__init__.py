"""All configuration in one typed place.

- `settings`: worker settings (`Settings`), from defaults, a configuration file, `LORA_WORKERS_*`
  environment variables and CLI flags.
- `pipelines`: one YAML file per task (`PipelineConfig`).
- `catalog`: the adapters a worker may serve (`AdapterCatalog`).
"""

from workers.core.config.base import REPO_ROOT, ConfigError
from workers.core.config.catalog import AdapterCatalog, AdapterEntry, load_catalog
from workers.core.config.engine import EngineSettings
from workers.core.config.pipelines import (
    BASE_TARGET,
    ChatRendering,
    ClassifierRouting,
    EmbeddingRouting,
    ParquetSinkConfig,
    PipelineConfig,
    RoutingConfig,
    SamplingDefaults,
    SamplingLimits,
    SamplingOutOfBounds,
    SamplingValues,
    StopLimit,
    load_pipeline,
    load_pipelines,
)
from workers.core.config.settings import (
    LLAMA_LORA_MODULES,
    AdapterSettings,
    AdmissionSettings,
    DeliverySettings,
    MergeSettings,
    Settings,
    ShadowSettings,
    SizeSettings,
)

__all__ = [
    "BASE_TARGET",
    "LLAMA_LORA_MODULES",
    "REPO_ROOT",
    "AdapterCatalog",
    "AdapterEntry",
    "AdapterSettings",
    "AdmissionSettings",
    "ChatRendering",
    "ClassifierRouting",
    "ConfigError",
    "DeliverySettings",
    "EmbeddingRouting",
    "EngineSettings",
    "MergeSettings",
    "ParquetSinkConfig",
    "PipelineConfig",
    "RoutingConfig",
    "SamplingDefaults",
    "SamplingLimits",
    "SamplingOutOfBounds",
    "SamplingValues",
    "Settings",
    "ShadowSettings",
    "SizeSettings",
    "StopLimit",
    "load_catalog",
    "load_pipeline",
    "load_pipelines",
]
