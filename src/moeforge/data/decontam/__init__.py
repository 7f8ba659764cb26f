"""Decontamination: find benchmark text inside training documents by word n-gram overlap; drop or cut it.

Benchmark items and documents are normalized alike (case, punctuation, accents and whitespace do not
matter) and split into words; a document matches an item where they share a run of ``ngram`` (13)
consecutive words. The parts, in the order data flows through them:

- :mod:`~moeforge.data.decontam.config`: the recipe's section (:class:`DecontamConfig`, one
  :class:`BenchmarkSpec` per benchmark) and :class:`BenchmarkError`;
- :mod:`~moeforge.data.decontam.loaders`: benchmark files read into items (:func:`load_benchmark`,
  :class:`BenchmarkItem`);
- :mod:`~moeforge.data.decontam.normalize`: the normalization rule, in full, and the hashing of words
  and n-grams (:func:`normalize_words`);
- :mod:`~moeforge.data.decontam.index`: which n-grams are indexed, what matches, the index's layout
  (:class:`DecontamIndex`, :class:`Match`, :func:`cached_index`);
- :mod:`~moeforge.data.decontam.apply`: the ``drop`` and ``cut`` policies (:func:`decontaminate`);
- :mod:`~moeforge.data.decontam.report`: outcomes counted per benchmark (:class:`DecontamReport`).

**Use.** A map task gets the index with :func:`cached_index` (built once per process), calls
:func:`decontaminate` per record and counts outcomes in a :class:`DecontamReport`
(``report.add(record, *decontaminate(record, index, cfg))``); task reports merge with
:meth:`DecontamReport.merge`. :meth:`DecontamIndex.contains_any` is the cheap yes/no check for a gate.
"""

from moeforge.data.decontam.apply import decontaminate
from moeforge.data.decontam.config import BenchmarkError, BenchmarkSpec, DecontamConfig
from moeforge.data.decontam.index import DecontamIndex, Match, cached_index
from moeforge.data.decontam.loaders import BenchmarkItem, load_benchmark
from moeforge.data.decontam.normalize import normalize_words
from moeforge.data.decontam.report import DecontamReport

__all__ = [
    "BenchmarkError",
    "BenchmarkItem",
    "BenchmarkSpec",
    "DecontamConfig",
    "DecontamIndex",
    "DecontamReport",
    "Match",
    "cached_index",
    "decontaminate",
    "load_benchmark",
    "normalize_words",
]
