"""Merging one adapter into a running vLLM engine's weights, and restoring them: the worker side
of `VllmEngine.merge` / `unmerge`, a vLLM `worker_extension_cls` whose methods run in the
engine-core process (`LLM.collective_rpc("lw_merge", ...)`).

What vLLM 0.32 does on the CPU, and what that asks of a merge:
- A linear layer's weight is packed for oneDNN (or sgl) after loading and the `weight` parameter
  left empty (`dispatch_cpu_unquantized_gemm(remove_weight=True)`): the layer computes with
  `layer.cpu_linear`. The base weight is read back exactly through that path (`x = I` gives
  `W^T`: each output is one weight times 1.0 plus zeros), the merged weight is packed the same
  way, and the original `cpu_linear` and parameter objects are kept: `unmerge` puts those very
  objects back, so the restored layers compute bit for bit as before (never a subtraction).
- LoRA kernels run for every batch, even with no LoRA request in it (a no-LoRA row indexes the
  last slot on the CPU: `workers.engine.vllm_engine.write_identity_adapter`), and the model
  runner rebuilds the per-token LoRA mapping before every step. While merged, every
  LoRA-wrapped layer forwards straight to its base layer and the mapping is not rebuilt, so the
  merged adapter's requests (sent without a LoRA request) pay for no LoRA work at all. Any
  other request would be mis-served: the caller keeps them out of the engine while merged.
- Packed modules (`qkv_proj` from q/k/v, `gate_up_proj` from gate/up): each adapter module's
  delta goes into its rows of the packed weight (the LoRA layer's `output_slices`).

The delta is PEFT's merge (`LoraLayer.get_delta_weight` with PEFT's default upcast of adapter
weights): `(B @ A) * scaling` in float32, scaling `alpha / r` (rsLoRA: `alpha / sqrt(r)`;
`rank_pattern` / `alpha_pattern` per module, as vLLM's `PEFTHelper` reads them), added to the
weight in float32 and rounded once to the engine's dtype.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EXTENSION = "workers.engine.inplace.InPlaceMergeExtension"


@dataclass
class _Saved:
    """A base layer's original objects while merged: put back as they were by `unmerge`."""

    layer: Any  # the vLLM base linear layer
    weight: Any  # its `weight` parameter (empty on the CPU: the packed copy computes)
    cpu_linear: Any  # its packed GEMM (CPU); None elsewhere


def effective_weight(layer: Any) -> torch.Tensor:
    """The weight `layer` computes with, exactly: its parameter where it keeps one, else read
    back through its packed GEMM."""
    import torch

    weight = layer.weight
    if weight.numel() > 0 or not hasattr(layer, "cpu_linear"):
        return weight.detach()
    inputs = int(layer.input_size_per_partition)
    eye = torch.eye(inputs, dtype=weight.dtype)
    return layer.cpu_linear(eye, None, None).t().contiguous()


def _install(layer: Any, weight: torch.Tensor) -> None:
    """`layer` computes with `weight` from now on (packed as vLLM packs it after loading)."""
    import torch

    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if hasattr(layer, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


def adapter_deltas(
    adapter_path: str,
    modules: dict[str, Any],
    packed: dict[str, list[str]],
    weights_mapper: Any,
    max_position_embeddings: int | None,
    fault_scale: float = 1.0,
) -> dict[str, list[tuple[slice, torch.Tensor]]]:
    """Each LoRA-wrapped module's float32 deltas, by the output rows they add to;
    `fault_scale` (tests only: engine.fault_injection_merge_scale) scales them."""
    from safetensors.torch import load_file
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    path = Path(adapter_path)
    peft = PEFTHelper.from_local_dir(str(path), max_position_embeddings)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    pairs: dict[str, dict[bool, torch.Tensor]] = {}
    checkpoint_names: dict[str, str] = {}
    for key, tensor in tensors.items():
        module, is_a = parse_fine_tuned_lora_name(key, weights_mapper)
        pairs.setdefault(module, {})[is_a] = tensor
        checkpoint_names[module] = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
    deltas: dict[str, list[tuple[slice, torch.Tensor]]] = {}
    for module, pair in pairs.items():
        if set(pair) != {True, False}:
            raise ValueError(f"{module}: the adapter has lora_A or lora_B alone")
        target, rows = _target(module, modules, packed)
        _, scaling = peft.get_rank_and_scaling(checkpoint_names[module])
        scaling *= fault_scale
        delta = (pair[False].float() @ pair[True].float()) * scaling
        if delta.shape[0] != rows.stop - rows.start:
            raise ValueError(f"{module}: delta has {delta.shape[0]} rows, the layer {rows}")
        deltas.setdefault(target, []).append((rows, delta))
    return deltas


def _target(
    module: str, modules: dict[str, Any], packed: dict[str, list[str]]
) -> tuple[str, slice]:
    """The LoRA-wrapped module an adapter module lands in, and its rows there."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    parent, _, leaf = module.rpartition(".")
    found: tuple[str, int] | None = (module, 0) if module in modules else None
    for packed_name, parts in packed.items():
        name = f"{parent}.{packed_name}"
        if found is None and leaf in parts and name in modules:
            found = (name, parts.index(leaf))
    if found is None:
        raise ValueError(f"{module}: no LoRA-wrapped module of the engine holds it")
    name, index = found
    layer = modules[name]
    if not isinstance(layer, BaseLinearLayerWithLoRA) or layer.tp_size != 1:
        raise ValueError(f"{module}: only linear layers on one device merge in place")
    start = sum(layer.output_slices[:index])
    return name, slice(start, start + layer.output_slices[index])


def _bypassable(modules: dict[str, Any]) -> None:
    """Every LoRA-wrapped layer must forward to its base layer with the same arguments; other
    kinds (MoE, classification heads) would keep computing LoRA while merged."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    kinds = (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA)
    others = sorted(name for name, module in modules.items() if not isinstance(module, kinds))
    if others:
        raise ValueError(f"LoRA layers that cannot be bypassed while merged: {others}")


def _no_loras(*_args: Any, **_kwargs: Any) -> None:
    return None


class InPlaceMergeExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): called by name through
    `collective_rpc`. Names are prefixed: vLLM refuses an extension that shadows the worker."""

    def _lw_lora_manager(self) -> Any:
        return self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]

    def _lw_state(self) -> dict[str, Any]:
        if not hasattr(self, "_lw_merge_state"):
            self._lw_merge_state: dict[str, Any] = {"adapter": None, "saved": {}}
        return self._lw_merge_state

    def lw_merge(self, adapter_path: str, fault_scale: float = 1.0) -> dict[str, Any]:
        """Merge the adapter at `adapter_path` into the base weights and bypass every LoRA
        layer; raises (having changed nothing) if it cannot."""
        state = self._lw_state()
        if state["adapter"] is not None:
            raise RuntimeError(f"{state['adapter']} is merged already: unmerge first")
        started = time.monotonic()
        manager = self._lw_lora_manager()
        _bypassable(manager.modules)
        model = self.model_runner.model  # type: ignore[attr-defined]
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None
        config = self.model_runner.model_config.hf_config.get_text_config()  # type: ignore[attr-defined]
        deltas = adapter_deltas(
            adapter_path,
            manager.modules,
            manager.packed_modules_mapping,
            mapper,
            getattr(config, "max_position_embeddings", None),
            fault_scale,
        )
        merged: dict[str, torch.Tensor] = {}
        for name, parts in deltas.items():
            base = manager.modules[name].base_layer
            original = effective_weight(base)
            weight = original.float().clone()
            for rows, delta in parts:
                weight[rows] += delta
            merged[name] = weight.to(original.dtype)
        # Everything computed: only now touch the engine, so a failure leaves it as it was.
        saved: dict[str, _Saved] = {}
        for name, weight in merged.items():
            base = manager.modules[name].base_layer
            saved[name] = _Saved(base, base.weight, getattr(base, "cpu_linear", None))
            _install(base, weight)
        for module in manager.modules.values():
            module.forward = module.base_layer.forward
        # No LoRA layer runs: the per-step LoRA mapping would be built for nothing.
        self.model_runner.set_active_loras = _no_loras  # type: ignore[attr-defined]
        state.update(adapter=adapter_path, saved=saved)
        return {"modules": len(saved), "seconds": time.monotonic() - started}

    def lw_unmerge(self) -> dict[str, Any]:
        """Put back the original weights and LoRA layers; nothing merged: nothing to do."""
        started = time.monotonic()
        state = self._lw_state()
        saved: dict[str, _Saved] = state["saved"]
        for item in saved.values():
            item.layer.weight = item.weight
            if item.cpu_linear is not None:
                item.layer.cpu_linear = item.cpu_linear
        for module in self._lw_lora_manager().modules.values():
            module.__dict__.pop("forward", None)  # the class's LoRA forward again
        self.model_runner.__dict__.pop("set_active_loras", None)  # type: ignore[attr-defined]
        state.update(adapter=None, saved={})
        return {"modules": len(saved), "seconds": time.monotonic() - started}

    def lw_merged_adapter(self) -> str | None:
        return self._lw_state()["adapter"]

    def lw_weight_digests(self) -> dict[str, str]:
        """sha256 of the weight each LoRA-wrapped layer computes with (tests: bit for bit)."""
        import torch

        digests = {}
        for name, module in sorted(self._lw_lora_manager().modules.items()):
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(base, "weight"):
                data = effective_weight(base).contiguous().view(torch.uint8)
                digests[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        return digests
