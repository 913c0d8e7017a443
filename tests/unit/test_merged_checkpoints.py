"""Merged checkpoints of zoo adapters: made with PEFT, cached, checked, pruned. Real files and
real weights (transformers on the CPU, the tiny model), no engine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workers.adapters.checks import AdapterRequirements, adapter_digest
from workers.adapters.merged import MANIFEST, MergedCheckpoints
from workers.core.config import LLAMA_LORA_MODULES, REPO_ROOT, MergeSettings
from workers.core.engine_api import AdapterHandle
from workers.core.errors import AdapterError, AdapterRejected

BASE = REPO_ROOT / "models" / "tiny-llama"
ZOO = REPO_ROOT / "models" / "adapters"
REQUIREMENTS = AdapterRequirements("tiny-llama", 8, LLAMA_LORA_MODULES, (ZOO,))


def handle(name: str, sha256: str | None = None) -> AdapterHandle:
    path = ZOO / name
    return AdapterHandle(name, "1", str(path), 1, sha256 or adapter_digest(path))


def checkpoints(root: Path, **limits: float) -> MergedCheckpoints:
    return MergedCheckpoints(MergeSettings(cache_dir=root, **limits), BASE, REQUIREMENTS, "float32")


def test_merged_weights_answer_as_the_adapter_does(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = checkpoints(tmp_path).get(handle("classifier"))
    assert merged.merge_s > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {
        p.name for p in merged.path.iterdir()
    }
    prompt = torch.tensor([[0, 15, 27, 99, 140, 7]])
    with torch.inference_mode():
        served = AutoModelForCausalLM.from_pretrained(str(merged.path))(prompt).logits
        base = AutoModelForCausalLM.from_pretrained(str(BASE))
        plain = base(prompt).logits
        adapted = PeftModel.from_pretrained(base, str(ZOO / "classifier"))(prompt).logits
    assert torch.allclose(served, adapted, atol=1e-4)
    assert not torch.allclose(served, plain, atol=1e-2)  # the adapter is really in there


def test_a_second_run_reuses_the_checkpoint_and_a_tampered_one_is_merged_again(
    tmp_path: Path,
) -> None:
    first = checkpoints(tmp_path).get(handle("summarizer"))
    again = checkpoints(tmp_path).get(handle("summarizer"))
    assert again.path == first.path and again.merge_s == 0.0
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    remade = checkpoints(tmp_path).get(handle("summarizer"))
    assert remade.merge_s > 0
    assert checkpoints(tmp_path).get(handle("summarizer")).merge_s == 0.0


def test_an_adapter_whose_files_changed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterRejected) as refused:
        checkpoints(tmp_path).get(handle("classifier", sha256="0" * 64))
    assert refused.value.code is AdapterError.CHECKSUM_MISMATCH
    assert not any(tmp_path.glob("*-*"))  # nothing merged


def test_the_cache_keeps_to_its_size_and_age_limits(tmp_path: Path) -> None:
    cache = checkpoints(tmp_path)
    old = cache.get(handle("classifier")).path
    newer = cache.get(handle("summarizer")).path
    stale = time.time() - 40 * 86_400
    os.utime(old / MANIFEST, (stale, stale))
    (tmp_path / ".staging-left-by-a-crash").mkdir()
    removed = checkpoints(tmp_path, cache_max_age_days=30).prune()
    assert set(removed) == {old, tmp_path / ".staging-left-by-a-crash"}
    assert newer.is_dir()
    # Over the size limit: least recently used first, but never the one being served.
    cache.get(handle("classifier"))
    tiny = checkpoints(tmp_path, cache_max_gib=1e-6)
    kept = tiny.get(handle("customer-tone")).path
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [kept]
