"""Composed adapters built with real PEFT from the real zoo, reloaded and checked like any
version. Expected deltas come straight from the source files (B @ A * lora_alpha / r), not from
PEFT, so a wrong weight, scaling or config in the composed adapter shows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.unit.adapter_fixtures import copy_adapter
from workers.adapters.checks import AdapterRequirements, inspect_adapter
from workers.adapters.compose import CompositionError, CompositionMethod, compose_adapter
from workers.core.config import LLAMA_LORA_MODULES, REPO_ROOT
from workers.core.errors import AdapterError, AdapterRejected

BASE = REPO_ROOT / "models" / "tiny-llama"
ZOO = REPO_ROOT / "models" / "adapters"
PROMPT = torch.tensor([[0, 15, 27, 99, 140, 7]])
Deltas = dict[str, torch.Tensor]


def requirements(root: Path, max_rank: int = 8) -> AdapterRequirements:
    return AdapterRequirements("tiny-llama", max_rank, LLAMA_LORA_MODULES, (root,))


def check(path: Path, max_rank: int = 8) -> int:
    reqs = requirements(path.parent, max_rank)
    facts = inspect_adapter(str(path), reqs, expected_sha256=None, claimed_base_model="tiny-llama")
    return facts.rank


def compose(out: Path, method: str, *sources: tuple[Path, float]) -> Path:
    return compose_adapter(
        list(sources), method=CompositionMethod(method), base_model_dir=BASE, out_dir=out
    )


def factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module name -> (A, B, scaling) as the adapter's own files define them."""
    config = json.loads((path / "adapter_config.json").read_text())
    root = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    scaling = config["lora_alpha"] / root
    tensors = load_file(path / "adapter_model.safetensors")
    modules = {key.removesuffix(".lora_A.weight") for key in tensors if "lora_A" in key}
    return {
        m: (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"], scaling) for m in modules
    }


def file_deltas(path: Path) -> Deltas:
    return {m: b @ a * s for m, (a, b, s) in factors(path).items()}


def reloaded(adapter: Path | None) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter))


def served_deltas(adapter: Path) -> Deltas:
    """What PEFT applies after loading the composed adapter: B @ A times its config scaling."""
    model = reloaded(adapter)
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if "default" in getattr(module, "lora_A", {})
    }


@torch.inference_mode()
def logits(adapter: Path | None) -> torch.Tensor:
    return reloaded(adapter)(PROMPT).logits


def assert_deltas(actual: Deltas, expected: Deltas) -> None:
    assert actual.keys() == expected.keys() and len(actual) == 14  # 2 layers x 7 modules
    for name, delta in expected.items():
        assert torch.allclose(actual[name], delta, atol=1e-5), name


def test_cat_is_the_exact_weighted_sum_of_deltas_at_the_summed_rank(tmp_path: Path) -> None:
    out = compose(tmp_path / "mix", "cat", (ZOO / "classifier", 0.7), (ZOO / "summarizer", 0.3))
    classifier, summarizer = file_deltas(ZOO / "classifier"), file_deltas(ZOO / "summarizer")
    expected = {m: 0.7 * classifier[m] + 0.3 * summarizer[m] for m in classifier}
    assert_deltas(served_deltas(out), expected)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 16)  # scalings are folded into A
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["target_modules"] == sorted(LLAMA_LORA_MODULES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]  # no staging left behind
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(AdapterRejected) as refused:
        check(out, max_rank=8)
    assert refused.value.code is AdapterError.RANK_TOO_LARGE
    assert check(out, max_rank=16) == 16


def test_an_rslora_source_keeps_its_own_scaling_and_the_result_is_plain(tmp_path: Path) -> None:
    # PEFT copies use_rslora into the composed config (scaling sqrt(r) instead of 1); the saved
    # config must not, or every engine would serve the delta sqrt(16) = 4 times too strong.
    rs = copy_adapter(tmp_path / "src", "classifier", use_rslora=True)
    out = compose(tmp_path / "mix", "cat", (rs, 1.0), (ZOO / "summarizer", 0.5))
    rs_deltas, summarizer = file_deltas(rs), file_deltas(ZOO / "summarizer")
    assert_deltas(served_deltas(out), {m: rs_deltas[m] + 0.5 * summarizer[m] for m in rs_deltas})


def test_linear_keeps_the_rank_passes_the_checks_and_is_not_a_sum_of_deltas(
    tmp_path: Path,
) -> None:
    sources = (ZOO / "customer-tone", 0.6), (ZOO / "partner-tone", 0.4)
    out = compose(tmp_path / "mix", "linear", *sources)
    assert check(out) == 8
    # PEFT scales A and B by sqrt(weight * scaling) each and sums them: delta has cross terms.
    parts = [(factors(path), w) for path, w in sources]
    expected, weighted_sum = {}, {}
    for m in parts[0][0]:
        a = sum(math.sqrt(w * f[m][2]) * f[m][0] for f, w in parts)
        b = sum(math.sqrt(w * f[m][2]) * f[m][1] for f, w in parts)
        expected[m] = b @ a
        weighted_sum[m] = sum(w * f[m][1] @ f[m][0] * f[m][2] for f, w in parts)
    served = served_deltas(out)
    assert_deltas(served, expected)
    assert not all(torch.allclose(served[m], weighted_sum[m], atol=1e-3) for m in served)
    composed = logits(out)
    for other in [None, ZOO / "customer-tone", ZOO / "partner-tone"]:
        assert not torch.allclose(composed, logits(other), atol=1e-3), other


def test_linear_of_one_source_reproduces_it(tmp_path: Path) -> None:
    out = compose(tmp_path / "same", "linear", (ZOO / "classifier", 1.0))
    assert check(out) == 8
    assert torch.allclose(logits(out), logits(ZOO / "classifier"), atol=1e-4)


def test_ties_keeps_the_rank_trims_the_factors_and_passes_the_checks(tmp_path: Path) -> None:
    out = compose(tmp_path / "mix", "ties", (ZOO / "classifier", 0.5), (ZOO / "summarizer", 0.5))
    assert check(out) == 8
    # density 0.5 keeps half of each source's A entries; where both were trimmed, A stays 0.
    a_factors = [a for a, _, _ in factors(out).values()]
    zeros = sum(int((a == 0).sum()) for a in a_factors) / sum(a.numel() for a in a_factors)
    assert 0.1 < zeros < 0.5
    assert not torch.allclose(logits(out), logits(None), atol=1e-3)


def rank4_adapter(root: Path) -> Path:
    base = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=sorted(LLAMA_LORA_MODULES))
    model = get_peft_model(base, LoraConfig(**{**lora.to_dict(), "init_lora_weights": False}))
    model.peft_config["default"].base_model_name_or_path = "tiny-llama"
    model.save_pretrained(str(root / "rank4"), save_embedding_layers=False)
    return root / "rank4"


def test_different_ranks_are_refused_by_linear_and_summed_by_cat(tmp_path: Path) -> None:
    rank4 = rank4_adapter(tmp_path / "src")
    with pytest.raises(CompositionError, match="equal ranks"):
        compose(tmp_path / "linear", "linear", (ZOO / "classifier", 0.5), (rank4, 0.5))
    assert not (tmp_path / "linear").exists()
    cat = compose(tmp_path / "cat", "cat", (ZOO / "classifier", 0.5), (rank4, 0.5))
    assert check(cat, max_rank=16) == 12


@pytest.mark.parametrize("weight", [0.0, -0.5, math.nan, math.inf])
def test_weights_must_be_positive_and_finite(tmp_path: Path, weight: float) -> None:
    with pytest.raises(CompositionError, match="positive and finite"):
        compose(tmp_path / "out", "cat", (ZOO / "classifier", 0.5), (ZOO / "summarizer", weight))


def test_sources_must_share_base_and_modules(tmp_path: Path) -> None:
    other_base = copy_adapter(tmp_path, "summarizer", "b", base_model_name_or_path="other-llama")
    fewer = copy_adapter(tmp_path, "summarizer", "m", target_modules=["q_proj", "v_proj"])
    same_base = copy_adapter(tmp_path, "summarizer", "s", base_model_name_or_path="/x/tiny-llama")
    with pytest.raises(CompositionError, match="base"):
        compose(tmp_path / "out", "cat", (ZOO / "classifier", 0.5), (other_base, 0.5))
    with pytest.raises(CompositionError, match="different modules"):
        compose(tmp_path / "out", "cat", (ZOO / "classifier", 0.5), (fewer, 0.5))
    with pytest.raises(CompositionError, match="at least one"):
        compose(tmp_path / "out", "cat")
    assert check(compose(tmp_path / "out", "cat", (ZOO / "classifier", 1), (same_base, 1)), 16)


def test_an_existing_output_is_never_overwritten_and_a_failure_leaves_nothing(
    tmp_path: Path,
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(CompositionError, match="already exists"):
        compose(taken, "linear", (ZOO / "classifier", 1.0))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(OSError):  # no base model there: fails once the work has begun
        compose_adapter(
            [(ZOO / "classifier", 1.0)],
            method=CompositionMethod.LINEAR,
            base_model_dir=tmp_path / "no-such-base",
            out_dir=tmp_path / "new",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine to fill
    assert check(compose(tmp_path / "empty", "linear", (ZOO / "classifier", 1.0))) == 8
