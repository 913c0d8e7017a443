"""Composed adapters: one LoRA adapter built from weighted others with PEFT's
`add_weighted_adapter`, saved as a standalone adapter directory like any zoo adapter.

PEFT folds every source's scaling (lora_alpha / r) and weight into the new A/B matrices and
gives the result lora_alpha == r, i.e. scaling 1. vLLM computes its scaling from the same config,
so the saved files serve exactly the delta PEFT computed:

- cat: rank = sum of source ranks; delta = sum(w_i * delta_i), exact.
- linear: equal ranks, rank kept; A = sum(sqrt(w_i s_i) A_i), B = sum(sqrt(w_i s_i) B_i), so
  delta = B @ A has cross terms B_i A_j: NOT the weighted sum of deltas (exact for one source).
- ties: equal ranks, rank kept; TIES (trim to `density`, elect sign, disjoint mean) applied to
  the A factors and to the B factors separately, not to the deltas.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from workers.adapters.checks import CONFIG_FILE, same_base_model

log = structlog.get_logger(__name__)

COMPOSED = "default"  # PEFT saves the "default" adapter at the top of the directory
# Source features add_weighted_adapter cannot combine (or drops silently).
UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "target_parameters")


class CompositionMethod(StrEnum):
    LINEAR = "linear"
    CAT = "cat"
    TIES = "ties"


class CompositionError(Exception):
    """Inputs that cannot make a composed adapter; the message says which and why."""


def _source_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        modules = config["target_modules"]  # a list, or one regex string
        config["r"], config["target_modules"] = (
            int(config["r"]),
            sorted([modules] if isinstance(modules, str) else modules),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompositionError(f"{path} is not a readable LoRA adapter: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise CompositionError(f"{path} is a {config.get('peft_type')} adapter, not LORA")
    used = [feature for feature in UNSUPPORTED if config.get(feature)]
    if used or config.get("bias", "none") != "none":
        raise CompositionError(f"{path} uses {used or ['bias']}, which cannot be composed")
    return config


def _check_sources(
    sources: Sequence[tuple[Path, float]], method: CompositionMethod, density: float
) -> list[dict[str, Any]]:
    if not sources:
        raise CompositionError("composition needs at least one source adapter")
    for path, weight in sources:
        if not (math.isfinite(weight) and weight > 0):
            raise CompositionError(f"weight {weight} of {path} must be positive and finite")
    if method is CompositionMethod.TIES and not 0 < density <= 1:
        raise CompositionError(f"density {density} must be in (0, 1]")
    configs = [_source_config(path) for path, _ in sources]
    first, first_path = configs[0], sources[0][0]
    first_base = first.get("base_model_name_or_path")
    for config, (path, _) in zip(configs[1:], sources[1:], strict=True):
        base = config.get("base_model_name_or_path")
        if not same_base_model(str(base or ""), str(first_base or "")):
            raise CompositionError(f"{path} is for base {base!r}, {first_path} for {first_base!r}")
        if config["target_modules"] != first["target_modules"]:
            raise CompositionError(f"{path} and {first_path} target different modules")
        if method is not CompositionMethod.CAT and config["r"] != first["r"]:
            raise CompositionError(
                f"{method} needs equal ranks: {path} has r={config['r']}, "
                f"{first_path} r={first['r']} (use cat)"
            )
    return configs


def compose_adapter(
    sources: Sequence[tuple[Path, float]],
    *,
    method: CompositionMethod,
    base_model_dir: Path,
    out_dir: Path,
    density: float = 0.5,
) -> Path:
    """Build the weighted combination of `sources` (adapter dir, weight) at `out_dir`.

    Written to a staging directory beside `out_dir` and renamed into place, so a crash never
    leaves half an adapter where the publisher would look."""
    method = CompositionMethod(method)
    configs = _check_sources(sources, method, density)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CompositionError(f"{out_dir} already exists and is not an empty directory")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        base = AutoModelForCausalLM.from_pretrained(
            str(base_model_dir), dtype=torch.float32, local_files_only=True
        )
        names = [f"source{i}" for i in range(len(sources))]
        model = PeftModel.from_pretrained(base, str(sources[0][0]), adapter_name=names[0])
        for name, (path, _) in zip(names[1:], sources[1:], strict=True):
            model.load_adapter(str(path), adapter_name=name)
        model.add_weighted_adapter(
            names, [w for _, w in sources], COMPOSED, combination_type=str(method), density=density
        )
        model.save_pretrained(
            str(staging),
            selected_adapters=[COMPOSED],
            safe_serialization=True,
            save_embedding_layers=False,
        )
        (staging / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        config_path = staging / CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = configs[0].get("base_model_name_or_path")
        if isinstance(config["target_modules"], list):  # peft writes a set in hash order
            config["target_modules"] = sorted(config["target_modules"])
        # Scalings are folded into A/B, so scaling must be 1. PEFT copies use_rslora from the
        # first source, which would make it sqrt(r); plain alpha == r is what it computed.
        config["lora_alpha"], config["use_rslora"] = config["r"], False
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            staging.rename(out_dir)  # replaces an empty directory; atomic either way
        except OSError as exc:
            raise CompositionError(f"{out_dir} appeared while composing: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "adapter_composed",
        method=str(method),
        sources=[f"{path}:{weight}" for path, weight in sources],
        rank=config["r"],
        path=str(out_dir),
        compose_s=round(time.monotonic() - started, 2),
    )
    return out_dir
