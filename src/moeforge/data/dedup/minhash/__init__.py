"""Near-duplicate detection with MinHash LSH, in bounded memory.

How the pipeline uses it (map tasks run in separate processes, then a reduce sharded by band)::

    keys = minhash_band_keys(texts, cfg)                 # map task: (n, bands) uint64
    write_task_keys(task_dir / "minhash.npy", keys)      # inside the task's atomic directory
    result = find_clusters(files, cfg, work_dir, shingles_of=reread, executor=ex)  # files in source order
    keep = choose_survivors(result, lengths, quality, holdout, cfg.policy)

**Shingles.** Text is lowercased. ``word`` shingles are n-grams of words, a word being a maximal run
of Unicode letters, digits and combining marks: punctuation and whitespace separate words and are
dropped. ``char`` shingles are n-grams of characters after each run of whitespace became one space
and leading/trailing whitespace was dropped (punctuation is kept). A document with at least one but
fewer than ``ngram`` tokens is a single shingle of all its tokens (so two such documents match only
when their tokens are equal); a document without tokens (empty, or only punctuation for ``word``) has
no shingles and no band keys, and is never a near-duplicate (exact dedup still sees it).

**Hashes.** Every hash is 64-bit and computed with numpy over whole batches of documents, with no
Python loop over words. ``fmix64`` is MurmurHash3's 64-bit finalizer, a bijection used as the mixer.
A word hashes to ``fmix64(Σ_i char_i · key_i + length·φ)`` (mod 2^64), ``key_i = fmix64(i + salt)``
for the character at position ``i``: multilinear hashing, universal when the keys are random. A
character hashes to ``fmix64(char + salt)``. An n-gram of token hashes ``t_0 … t_{k-1}`` hashes to
``fmix64(Horner_K(t) + k·φ)``. These do not depend on the seed, so shingle sets are comparable
across configs.

**Permutations.** Permutation ``i`` maps a shingle hash ``x`` to ``(a_i·x + b_i) mod 2^64`` with
``a_i`` odd and ``a_i, b_i`` drawn from ``numpy.random.default_rng(seed)``. With an odd multiplier
this is a bijection of the 64-bit values, i.e. a true permutation of the hash universe, so it adds no
collisions; its order is led by the product's high bits, which depend on every bit of ``x``
(Dietzfelbinger's multiply-shift family, 2-approximately universal). The classic
``(a·x + b) mod (2^61 − 1)`` is 2-universal as well; neither is min-wise independent, and both rely
on the inputs having entropy (Mitzenmacher & Vadhan 2008), which the fmix64-mixed shingle hashes
supply. datasketch 2.0 moved to the same affine-mod-2^w family after an fmix pre-mix (its
``affine32``/``affine64`` schemes). The choice is for speed: numpy multiplies uint64 natively
(wrapping mod 2^64) but has no 128-bit product, so an exact Mersenne reduction costs ~12 array passes
per permutation against 2 here (measured ~13× slower). ``tests/data/test_minhash.py`` checks that
signature agreement estimates Jaccard within the binomial error. The signature of a document is the
minimum per permutation (uint64; ``2^64 − 1`` when it has no shingles), computed as a
permutations × shingles block so each permutation's row is contiguous.

**Bands.** ``num_perm = bands × rows``. A band key is ``fmix64(Horner_K(rows) + band·φ)``, never 0;
0 marks a document without shingles. Two documents with Jaccard ``s`` share at least one band key
with probability ``1 − (1 − s^rows)^bands``; the S-curve's threshold is ``(1/bands)^(1/rows)``
(:func:`lsh_curve`). The defaults, 16 bands × 8 rows = 128 permutations, put the threshold at 0.707
and catch pairs at Jaccard 0.8 with probability 0.947 (0.994 at 0.85), pairs at 0.5 with 0.061:
favouring recall at J ≈ 0.8, with ``verify_jaccard`` available to remove the false positives.

**Clusters.** A distributed reduce, sharded by band. Each task file holds, per band, the task's
``(key, row)`` pairs sorted by key. The bands are split into at most :data:`MAX_BAND_SHARDS` contiguous
shards (a constant, so results and statistics never depend on the executor or the worker count); a shard
(:func:`cluster_band_shard`, one task on the run's executor: this process, a local worker or Ray) takes
its bands one at a time and merges the sorted runs of all tasks, a bounded chunk of each at a time, so a
band's buckets are never all in memory (a bucket larger than a chunk is streamed). Each bucket (docs
sharing the band key) yields the pairs (first member, member). Without ``verify_jaccard`` the shard joins
them in its own union-find and writes its spanning forest (pairs (root, member)); with it, the shard
writes its distinct candidate pairs, split into parts by first document, and one verification task per
part (:func:`verify_part`) checks each distinct pair once (over all bands) against the true Jaccard of
the two shingle sets from the ``shingles_of`` callback, at most ``verify_batch_docs`` documents per call,
and writes the pairs that pass. The parent then joins all written edges in one union-find whose roots
are always the lowest index of their component, so the clusters are the components of the (verified)
candidate graph whatever the order. Results do not depend on the memory budget (tested with 1-row
chunks).

**Which document survives** (:func:`choose_survivors`): one per cluster; a document from a held-out
family first, then by policy — ``keep_first`` (source order), ``keep_longest``, ``keep_best_quality``
— and ties go to the first in source order, as in :mod:`moeforge.data.dedup.exact`.

**Bytes per document.** Map task: 8·bands (band keys, 128 B at the defaults) per document of the
task, plus, for the batch being hashed (~``memory_mb``·4096 characters, 1 M at the defaults), ~50 B
per character (code points, masks, word-character hashes), 8·bands·rows per document (signatures)
and an 8 MB block of permuted values. On disk: 12·bands per document (192 B at 16 bands). Reduce: 8
per document in the parent (the final union-find array, returned as ``root``); per band shard 8 per
document (its own union-find; with verification, 16 per distinct candidate pair instead) plus the merge
buffers, bounded by ``memory_mb`` whatever the number of documents; edges between the steps go to
``work_dir`` (16 B each). :func:`choose_survivors`: 1 per document (the answer) plus 9 transient, and
~40 per document that is in a cluster.

**Modules.** The code lives in :mod:`~moeforge.data.dedup.minhash.config` (:class:`MinHashConfig`, the
S-curve), :mod:`~moeforge.data.dedup.minhash.hashing` (shingles, signatures, band keys, and
:func:`minhash_band_keys` for a map task) and :mod:`~moeforge.data.dedup.minhash.clusters` (the task
files, the band merge and union-find, :func:`choose_survivors`); this package re-exports their public
names.
"""

from moeforge.data.dedup.minhash.clusters import (
    MAX_BAND_SHARDS,
    TASK_KEY_DTYPE,
    NearDupResult,
    NearDupStats,
    ShinglesOf,
    band_shards,
    choose_survivors,
    cluster_band_shard,
    find_clusters,
    verify_part,
    write_task_keys,
)
from moeforge.data.dedup.minhash.config import LshCurve, MinHashConfig, Policy, format_lsh_curve, lsh_curve
from moeforge.data.dedup.minhash.hashing import (
    EMPTY_SIGNATURE,
    NO_KEY,
    SIG_BLOCK_BYTES,
    band_keys,
    minhash_band_keys,
    shingle_batch,
    shingles,
    signatures,
)

__all__ = [
    "EMPTY_SIGNATURE",
    "MAX_BAND_SHARDS",
    "NO_KEY",
    "SIG_BLOCK_BYTES",
    "TASK_KEY_DTYPE",
    "LshCurve",
    "MinHashConfig",
    "NearDupResult",
    "NearDupStats",
    "Policy",
    "ShinglesOf",
    "band_keys",
    "band_shards",
    "choose_survivors",
    "cluster_band_shard",
    "find_clusters",
    "format_lsh_curve",
    "lsh_curve",
    "minhash_band_keys",
    "shingle_batch",
    "shingles",
    "signatures",
    "verify_part",
    "write_task_keys",
]
