"""MinHash LSH finds near-duplicates, clusters them transitively in bounded memory, and keeps one per
cluster by policy — the same at any memory budget and for a given seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from moeforge.data.dedup.minhash import (
    MinHashConfig,
    NearDupResult,
    band_keys,
    choose_survivors,
    find_clusters,
    format_lsh_curve,
    lsh_curve,
    minhash_band_keys,
    shingle_batch,
    shingles,
    signatures,
    write_task_keys,
)

VOCAB = [f"w{i}x" for i in range(5000)]


def _doc(rng: random.Random, n_words: int = 300) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n_words))


def _edit_scattered(rng: random.Random, text: str, rate: float) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), round(rate * len(words))):
        words[i] = rng.choice(VOCAB) + "e"
    return " ".join(words)


def _edit_span(rng: random.Random, text: str, rate: float) -> str:
    """Replace one contiguous run of ``rate`` of the words (a changed sentence or boilerplate block)."""
    words = text.split()
    k = round(rate * len(words))
    s = rng.randrange(len(words) - k)
    words[s : s + k] = [rng.choice(VOCAB) + "e" for _ in range(k)]
    return " ".join(words)


def _jaccard(a: str, b: str, cfg: MinHashConfig) -> float:
    x, y = shingles(a, cfg), shingles(b, cfg)
    inter = len(np.intersect1d(x, y))
    return inter / (len(x) + len(y) - inter)


def _run(tmp_path, tasks: list[list[str]], cfg: MinHashConfig, **kw) -> NearDupResult:
    """Hash each task's texts into its own key file, then cluster them all."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = []
    for t, texts in enumerate(tasks):
        path = tmp_path / f"task{t}.npy"
        write_task_keys(path, minhash_band_keys(texts, cfg))
        files.append(path)
    return find_clusters(files, cfg, tmp_path / "work", **kw)


def _shingles_of(texts: list[str], cfg: MinHashConfig, calls: list[list[int]] | None = None):
    def get(indices: list[int]) -> dict[int, np.ndarray]:
        if calls is not None:
            calls.append(list(indices))
        return {i: shingles(texts[i], cfg) for i in indices}

    return get


# ------------------------------------------------------------------------------------ shingles


def test_word_shingles_ignore_case_and_punctuation_and_do_not_cross_documents():
    cfg = MinHashConfig(ngram=2)
    assert np.array_equal(shingles("Hello, World! Foo", cfg), shingles("hello world -- foo", cfg))
    assert not np.array_equal(shingles("hello world foo", cfg), shingles("world hello foo", cfg))
    assert len(shingles("один два три", cfg)) == 2  # Cyrillic letters are word characters
    hashes, offsets = shingle_batch(["a b", "c d"], cfg)
    assert offsets.tolist() == [0, 1, 2]  # no "b c" shingle across the two documents
    assert set(hashes.tolist()) == set(shingles("a b", cfg).tolist()) | set(shingles("c d", cfg).tolist())


def test_char_shingles_collapse_whitespace_and_keep_punctuation():
    cfg = MinHashConfig(shingle="char", ngram=3)
    assert np.array_equal(shingles("  Ab \n\t c!  ", cfg), shingles("ab c!", cfg))
    assert len(shingles("ab c!", cfg)) == 3
    assert not np.array_equal(shingles("ab c!", cfg), shingles("ab c?", cfg))


def test_empty_and_short_documents():
    """No tokens → no shingles, key 0, never clustered; 1 ≤ tokens < n → one shingle of all of them."""
    cfg = MinHashConfig()
    assert len(shingles("", cfg)) == 0 and len(shingles(" ?! ", cfg)) == 0
    assert len(shingles("two words", cfg)) == 1
    assert not np.array_equal(shingles("two words", cfg), shingles("two other", cfg))
    keys = minhash_band_keys(["", "two words", "...", "two  WORDS!"], cfg)
    assert (keys[[0, 2]] == 0).all() and (keys[[1, 3]] != 0).all()
    assert np.array_equal(keys[1], keys[3])


def test_batch_equals_one_document_at_a_time(tmp_path):
    rng = random.Random(1)
    texts = [_doc(rng, rng.randint(0, 40)) for _ in range(30)] + ["", "x", "Ünïcödé wörds ok"]
    cfg = MinHashConfig(memory_mb=1)
    alone = band_keys(signatures([shingles(t, cfg) for t in texts], cfg), cfg)
    assert np.array_equal(minhash_band_keys(texts, cfg), alone)
    assert np.array_equal(minhash_band_keys(iter(texts), cfg.model_copy(update={"memory_mb": 512})), alone)


# ------------------------------------------------------------------------- hashing and S-curve


def test_signature_agreement_estimates_jaccard_within_binomial_error():
    """The (a·x + b) mod 2^64 permutations behave like random ones on fmix64 shingle hashes."""
    cfg = MinHashConfig()
    gen = np.random.default_rng(7)
    agree = []
    for _ in range(300):
        common, a_only, b_only = (gen.integers(0, 2**63, size=k, dtype=np.uint64) for k in (100, 50, 50))
        a, b = np.concatenate([common, a_only]), np.concatenate([common, b_only])
        sig = signatures([a, b], cfg)
        agree.append(float((sig[0] == sig[1]).mean()))
    j, n = 0.5, cfg.num_perm
    assert abs(np.mean(agree) - j) < 4 * np.sqrt(j * (1 - j) / n / len(agree))
    assert np.std(agree) == pytest.approx(np.sqrt(j * (1 - j) / n), rel=0.2)


def test_s_curve_threshold_and_probabilities():
    curve = lsh_curve(16, 8)
    assert curve.threshold == pytest.approx((1 / 16) ** (1 / 8)) and curve.threshold == pytest.approx(
        0.7071, abs=1e-4
    )
    p = dict(zip(curve.jaccard, curve.probability, strict=True))
    assert p[0.8] == pytest.approx(1 - (1 - 0.8**8) ** 16) and p[0.8] > 0.94
    assert p[0.5] < 0.07 and p[1.0] == 1.0
    assert list(curve.probability) == sorted(curve.probability)
    assert "threshold (1/b)^(1/r) = 0.707" in format_lsh_curve(curve)
    defaults = MinHashConfig()
    assert (defaults.bands, defaults.rows, defaults.num_perm) == (16, 8, 128)
    with pytest.raises(ValueError, match="at least 1"):
        lsh_curve(0, 8)


def test_config_is_strict():
    with pytest.raises(ValidationError, match="extra"):
        MinHashConfig(band=4)
    with pytest.raises(ValidationError, match="too many"):
        MinHashConfig(bands=100, rows=64)


# ------------------------------------------------------------------------------------ clusters


def test_identical_docs_cluster_and_unrelated_docs_do_not(tmp_path):
    rng = random.Random(2)
    base = [_doc(rng) for _ in range(40)]
    tasks = [[*base[:20], base[3], ""], [*base[20:], base[3].upper(), base[25], ""]]
    result = _run(tmp_path, tasks, MinHashConfig())
    root = result.root
    assert root[20] == root[42] == 3 and root[3] == 3  # three copies of doc 3, in two tasks
    assert root[43] == 27  # base[25], the 6th doc of task 1
    clustered = {i for i in range(len(root)) if root[i] != i} | {3, 27}
    assert clustered == {3, 20, 42, 27, 43}  # nothing else, not the two empty docs
    assert result.in_cluster.sum() == 5
    s = result.stats
    assert (s.docs, s.clusters, s.docs_in_clusters, s.docs_without_shingles) == (45, 2, 5, 2)
    assert s.cluster_sizes == {"2": 1, "3": 1}


def test_near_copies_with_a_tenth_of_words_replaced_in_one_span_cluster(tmp_path):
    rng = random.Random(3)
    cfg = MinHashConfig()
    originals = [_doc(rng) for _ in range(40)]
    copies = [_edit_span(rng, t, 0.10) for t in originals]
    assert np.mean([_jaccard(a, b, cfg) for a, b in zip(originals, copies, strict=True)]) > 0.78
    root = _run(tmp_path, [originals, copies], cfg).root
    found = sum(root[40 + i] == i for i in range(40))
    assert found >= 34  # P(candidate | J≈0.79) ≈ 0.94
    assert (root[:40] == np.arange(40)).all()  # no two originals joined


def test_scattered_edits_need_a_lower_threshold_config(tmp_path):
    """Replacing 10% of words at random breaks ~41% of word 5-grams (J ≈ 0.42): below the J≈0.8
    defaults by design; 3-grams with 32 bands × 4 rows (threshold 0.42) catch them."""
    rng = random.Random(4)
    originals = [_doc(rng) for _ in range(40)]
    copies = [_edit_scattered(rng, t, 0.10) for t in originals]
    j5 = np.mean([_jaccard(a, b, MinHashConfig()) for a, b in zip(originals, copies, strict=True)])
    assert j5 == pytest.approx(0.9**5 / (2 - 0.9**5), abs=0.04)
    cfg = MinHashConfig(ngram=3, bands=32, rows=4)
    root = _run(tmp_path, [originals, copies], cfg).root
    assert sum(root[40 + i] == i for i in range(40)) >= 34


def test_clusters_are_transitive_across_bands_and_tasks(tmp_path):
    """0~1 share only band 0, 1~2 only band 5, 2~3 only band 9 → one cluster {0,1,2,3}; 4 alone."""
    cfg = MinHashConfig(bands=10, rows=2)
    keys = np.arange(1, 51, dtype=np.uint64).reshape(5, 10) * np.uint64(1000)
    keys[1, 0] = keys[0, 0]
    keys[2, 5] = keys[1, 5]
    keys[3, 9] = keys[2, 9]
    write_task_keys(tmp_path / "a.npy", keys[:2])
    write_task_keys(tmp_path / "b.npy", keys[2:])
    result = find_clusters([tmp_path / "a.npy", tmp_path / "b.npy"], cfg, tmp_path / "w")
    assert result.root.tolist() == [0, 0, 0, 0, 4]
    assert result.root.dtype == np.int64
    assert (result.stats.buckets, result.stats.candidate_pairs, result.stats.bands) == (3, 3, 10)


def _mixed_corpus(seed: int) -> tuple[list[list[str]], list[str]]:
    """Tasks with exact copies (one bucket larger than any tiny chunk), near copies and singletons."""
    rng = random.Random(seed)
    base = [_doc(rng, 120) for _ in range(30)]
    texts = base + [base[0]] * 12 + [_edit_span(rng, b, 0.05) for b in base[:10]] + ["", "short doc"] * 2
    rng.shuffle(texts)
    tasks = [texts[:20], [], texts[20:21], texts[21:]]
    return tasks, [t for task in tasks for t in task]


@pytest.mark.parametrize("verify", [None, 0.5])
def test_tiny_memory_budget_gives_the_same_clusters_as_a_large_one(tmp_path, verify):
    tasks, flat = _mixed_corpus(5)
    cfg = MinHashConfig(verify_jaccard=verify)
    of = _shingles_of(flat, cfg) if verify else None
    big = _run(tmp_path / "big", tasks, cfg, shingles_of=of)
    assert big.stats.merge_steps == cfg.bands and big.stats.clusters >= 10
    for rows in (1, 2, 3):
        small = _run(tmp_path / f"c{rows}", tasks, cfg, shingles_of=of, chunk_rows=rows)
        assert small.stats.merge_steps > 10 * cfg.bands
        assert not list((tmp_path / f"c{rows}" / "work").iterdir())  # spilled pairs were removed
        assert np.array_equal(small.root, big.root)
        same = {k: v for k, v in small.stats.to_dict().items() if k not in ("merge_steps", "peak_bytes")}
        assert same == {
            k: v for k, v in big.stats.to_dict().items() if k not in ("merge_steps", "peak_bytes")
        }


def test_same_seed_same_keys_other_seed_other_keys_same_clusters(tmp_path):
    tasks, flat = _mixed_corpus(6)
    a = minhash_band_keys(flat, MinHashConfig(seed=11))
    assert np.array_equal(a, minhash_band_keys(flat, MinHashConfig(seed=11)))
    assert not np.array_equal(a[a != 0], minhash_band_keys(flat, MinHashConfig(seed=12))[a != 0])
    r1 = _run(tmp_path / "s1", tasks, MinHashConfig(seed=11)).root
    assert np.array_equal(r1, _run(tmp_path / "s1b", tasks, MinHashConfig(seed=11)).root)
    r2 = _run(tmp_path / "s2", tasks, MinHashConfig(seed=12)).root
    copies = [i for i, t in enumerate(flat) if flat.count(t) == 13]  # the 13 exact copies of one doc
    assert len(copies) == 13 and len(set(r1[copies])) == 1 and np.array_equal(r1[copies], r2[copies])


def test_verify_jaccard_removes_a_planted_false_positive(tmp_path):
    rng = random.Random(7)
    cfg = MinHashConfig(verify_jaccard=0.8)
    texts = [_doc(rng), _doc(rng)]
    texts += [texts[0], _edit_span(rng, texts[1], 0.02)]  # two true near-duplicates
    keys = minhash_band_keys(texts, cfg)
    keys[1, 7] = keys[0, 7]  # an LSH collision between unrelated docs 0 and 1
    write_task_keys(tmp_path / "k.npy", keys)
    files = [tmp_path / "k.npy"]
    plain = find_clusters(files, cfg.model_copy(update={"verify_jaccard": None}), tmp_path / "w1")
    assert plain.root.tolist() == [0, 0, 0, 0]
    calls: list[list[int]] = []
    checked = find_clusters(
        files, cfg, tmp_path / "w2", shingles_of=_shingles_of(texts, cfg, calls), verify_batch_docs=2
    )
    assert checked.root.tolist() == [0, 1, 0, 1]
    assert checked.stats.rejected_pairs == 1 and checked.stats.verified_pairs == 3
    assert calls and max(len(c) for c in calls) <= 2
    assert not list((tmp_path / "w2").iterdir())  # spilled pairs are cleaned up
    with pytest.raises(ValueError, match="shingles_of"):
        find_clusters(files, cfg, tmp_path / "w3")


def test_key_file_for_another_band_count_is_refused_with_its_name(tmp_path):
    write_task_keys(tmp_path / "t.npy", np.ones((3, 4), dtype=np.uint64))
    with pytest.raises(ValueError, match=r"t\.npy.*16 bands"):
        find_clusters([tmp_path / "t.npy"], MinHashConfig(), tmp_path / "w")


# ------------------------------------------------------------------------------------ survivors


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        # cluster {0, 2, 3, 5} (root 0) and {1, 4} (root 1); 6 alone
        ("keep_first", [0, 1, 6]),
        ("keep_longest", [3, 1, 6]),  # 3 and 5 tie on length: the first wins
        ("keep_best_quality", [2, 4, 6]),
    ],
)
def test_policy_chooses_one_survivor_per_cluster(policy, kept):
    result = NearDupResult(root=np.array([0, 1, 0, 0, 1, 0, 6]), stats=None)  # type: ignore[arg-type]
    lengths = np.array([10, 5, 20, 30, 5, 30, 1])
    quality = np.array([0.1, 0.2, 0.9, 0.5, 0.3, 0.9, 0.0])
    keep = choose_survivors(result, lengths, quality, np.zeros(7, dtype=bool), policy)
    assert sorted(np.flatnonzero(keep).tolist()) == sorted(kept)


def test_held_out_member_survives_whatever_the_policy():
    result = NearDupResult(root=np.array([0, 0, 0, 3]), stats=None)  # type: ignore[arg-type]
    holdout = np.array([False, False, True, False])
    for policy in ("keep_first", "keep_longest", "keep_best_quality"):
        keep = choose_survivors(result, np.array([9, 9, 1, 1]), np.array([1.0, 1, 0, 0]), holdout, policy)
        assert keep.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="unknown near_dedup policy"):
        choose_survivors(result, np.ones(4), np.ones(4), holdout, "keep_last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lengths has 3 entries for 4"):
        choose_survivors(result, np.ones(3), np.ones(4), holdout, "keep_first")
