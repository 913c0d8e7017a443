"""Merged checkpoints: a base model with one adapter version folded into its weights (PEFT's
`merge_and_unload`), served by an engine without LoRA at the base model's speed: a worker
dedicated to one adapter (`merge.dedicated_adapter`) runs on one. Bulk runs no longer use them:
they merge in place on their one LoRA engine (`workers.engine.inplace`), without an engine start.

Cached on disk, keyed by the base model's and the adapter's sha256, so a nightly run merges once
and every later run reuses the result. A cached checkpoint gets the checks an adapter gets: its
manifest must name this base and this adapter version, and its files must still have the
checksums written when it was made. Entries are written atomically (a temporary directory
renamed into place) and the cache is kept under a size and age limit, least recently used first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import structlog

from workers.adapters.checks import AdapterRequirements, adapter_digest, inspect_adapter
from workers.core.config import MergeSettings
from workers.core.engine_api import AdapterHandle, MergedModel
from workers.core.errors import AdapterError, AdapterRejected

log = structlog.get_logger(__name__)

MANIFEST = "merged-manifest.json"
# Everything of the base model but its weights goes with the merged weights: tokenizer files,
# chat template, generation config.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _file_digests(directory: Path) -> dict[str, str]:
    return {
        file.relative_to(directory).as_posix(): _file_sha256(file)
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def merge_into_base(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> None:
    """Base + adapter merged with PEFT, saved as a checkpoint vLLM loads like any model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    for file in base_dir.iterdir():
        weights = file.suffix in WEIGHT_SUFFIXES or file.name in WEIGHT_INDEXES
        if file.is_file() and not weights and not (out_dir / file.name).exists():
            shutil.copy2(file, out_dir / file.name)


class MergedCheckpoints:
    """The on-disk cache of merged checkpoints for one base model."""

    def __init__(
        self,
        settings: MergeSettings,
        base_model: Path,
        requirements: AdapterRequirements,
        dtype: str,
    ) -> None:
        self._settings = settings
        self._root = settings.cache_dir
        self._base_model = base_model
        self._requirements = requirements
        self._dtype = dtype
        self._base_sha256: str | None = None

    @property
    def base_sha256(self) -> str:
        if self._base_sha256 is None:
            self._base_sha256 = self._base_digest()
        return self._base_sha256

    def _entry(self, adapter: AdapterHandle) -> Path:
        return self._root / f"{self.base_sha256[:20]}-{(adapter.sha256 or '')[:20]}"

    def is_cached(self, adapter: AdapterHandle) -> bool:
        """A checkpoint for this version is in the cache (not verified: `get` does that)."""
        return adapter.sha256 is not None and (self._entry(adapter) / MANIFEST).is_file()

    def get(self, adapter: AdapterHandle) -> MergedModel:
        """The adapter version merged into the base: from the cache if a sound copy is there,
        else merged now. `AdapterRejected` if the adapter fails its checks."""
        if adapter.sha256 is None:
            raise AdapterRejected(
                AdapterError.CHECKSUM_MISMATCH, f"{adapter.engine_name} has no sha256 to key on"
            )
        # The adapter's own checks first: its files must still be the version announced.
        inspect_adapter(
            adapter.path,
            self._requirements,
            expected_sha256=adapter.sha256,
            claimed_base_model=self._requirements.base_model,
        )
        entry = self._entry(adapter)
        if entry.is_dir():
            problem = self._problem_with(entry, adapter)
            if problem is None:
                (entry / MANIFEST).touch()  # most recently used
                log.info("merged_checkpoint_reused", adapter=adapter.engine_name, path=str(entry))
                return MergedModel(adapter, entry, self.base_sha256, merge_s=0.0)
            log.warning("merged_checkpoint_discarded", adapter=adapter.engine_name, reason=problem)
            shutil.rmtree(entry, ignore_errors=True)
        return self._merge(adapter, entry)

    def _merge(self, adapter: AdapterHandle, entry: Path) -> MergedModel:
        started = time.monotonic()
        self._root.mkdir(parents=True, exist_ok=True)
        staging = self._root / f".staging-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            merge_into_base(self._base_model, Path(adapter.path), staging, self._dtype)
            manifest = {
                "base_model": str(self._base_model),
                "base_sha256": self.base_sha256,
                "adapter": adapter.name,
                "version": adapter.version,
                "adapter_sha256": adapter.sha256,
                "files": _file_digests(staging),
                "created_at": time.time(),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                staging.rename(entry)  # atomic: readers see no entry or a whole one
            except OSError:
                if self._problem_with(entry, adapter) is not None:
                    raise
                # Another run merged the same version meanwhile; theirs is as good.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        merge_s = time.monotonic() - started
        log.info(
            "merged_checkpoint_written", adapter=adapter.engine_name, merge_s=round(merge_s, 2)
        )
        self.prune(keep=entry)
        return MergedModel(adapter, entry, self.base_sha256, merge_s=merge_s)

    def _problem_with(self, entry: Path, adapter: AdapterHandle) -> str | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return f"no readable manifest: {exc}"
        expected = {
            "base_sha256": self.base_sha256,
            "adapter_sha256": adapter.sha256,
            "adapter": adapter.name,
        }
        for field, value in expected.items():
            if manifest.get(field) != value:
                return f"manifest {field} is {manifest.get(field)!r}, expected {value!r}"
        if _file_digests(entry) != manifest.get("files"):
            return "files differ from the checksums written when it was merged"
        return None

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Drop entries past the age limit, then the least recently used until the cache fits
        its size limit; `keep` stays whatever its age or size."""
        if not self._root.is_dir():
            return []
        now = time.time()
        max_age_s = self._settings.cache_max_age_days * 86_400
        entries = []
        for entry in self._root.iterdir():
            if not entry.is_dir():
                continue
            manifest = entry / MANIFEST
            used = manifest.stat().st_mtime if manifest.exists() else entry.stat().st_mtime
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            entries.append((used, size, entry))
        entries.sort()  # oldest use first
        removed = []
        total = sum(size for _, size, _ in entries)
        for used, size, entry in entries:
            too_old = now - used > max_age_s
            too_big = total > self._settings.cache_max_gib * 2**30
            if entry != keep and (too_old or too_big or entry.name.startswith(".staging-")):
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
                removed.append(entry)
        if removed:
            log.info("merged_cache_pruned", removed=[p.name for p in removed])
        return removed

    def _base_digest(self) -> str:
        """The base model's sha256, remembered per file sizes and times: hashing a large model
        on every run would cost more than some runs."""
        stamp = [
            [f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(self._base_model.iterdir())
            if f.is_file()
        ]
        memo_path = self._root / "base-digests.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        key = str(self._base_model.resolve())
        remembered = memo.get(key)
        if isinstance(remembered, dict) and remembered.get("stamp") == stamp:
            return str(remembered["sha256"])
        digest = adapter_digest(self._base_model)
        memo[key] = {"stamp": stamp, "sha256": digest}
        self._root.mkdir(parents=True, exist_ok=True)
        staging = memo_path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        staging.write_text(json.dumps(memo, indent=2))
        staging.replace(memo_path)
        return digest
