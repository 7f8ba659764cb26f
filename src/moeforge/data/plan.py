"""Planning a run: recipe sources → tasks, and the items each task reads.

A task is a run of consecutive input files of one source (at most ``MAX_TASK_FILES`` files or
``MAX_TASK_BYTES`` bytes), so a directory of many small files does not become thousands of tasks, while
files of a few MB each are their own tasks and keep every worker busy. (A single large file is one
task; split it into shards to spread it over workers.) Task ids (``s00-t00003``) depend only on the recipe and the sorted file
list, so a resumed run plans the same tasks.

Built-in sources read data that ships with Python or moeforge, so the demo needs no downloads:
``stdlib`` (the standard library's non-empty ``.py`` files, named ``stdlib://<relative path>`` so records are the
same on every machine with the same Python), ``pydoc_topics`` (the help texts in ``pydoc_data``), and
``word_problems`` (generated GSM8K-style problems, see :mod:`moeforge.data.synth`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moeforge.data.recipe import Recipe, SourceConfig
from moeforge.data.sources import Quarantined, RawItem, SourceError, expand_inputs, read_source

__all__ = ["InputFile", "Task", "iter_task_items", "plan_tasks"]

MAX_TASK_FILES = 512
MAX_TASK_BYTES = 4 * 2**20
_STDLIB_SKIP = ("site-packages/*", "*/site-packages/*", "test/*", "*/tests/*", "idlelib/*", "lib2to3/*")


@dataclass(frozen=True)
class InputFile:
    """One input: where it is read from and the URI that records name."""

    path: str
    uri: str


@dataclass(frozen=True)
class Task:
    task_id: str
    source_index: int
    inputs: tuple[InputFile, ...] = field(default_factory=tuple)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _source_files(src: SourceConfig) -> list[InputFile]:
    if src.builtin == "stdlib":
        root = _stdlib_root()
        include = src.include or ["*.py"]
        exclude = [*_STDLIB_SKIP, *src.exclude]
        files = []
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if _matches(rel, include) and not _matches(rel, exclude) and f.stat().st_size > 0:
                files.append(InputFile(str(f), f"stdlib://{rel}"))
    elif src.builtin == "pydoc_topics":
        import pydoc_data.topics as topics

        files = [InputFile(str(topics.__file__), "pydoc://topics")]
    elif src.builtin == "word_problems":
        files = [InputFile("", f"builtin://word_problems?count={src.count}&seed={src.seed}")]
    elif src.hf is not None:
        from moeforge.data.hf_source import check_hf_source, hf_uri

        check_hf_source(src.hf)
        files = [InputFile("", hf_uri(src.hf))]
    else:
        assert src.path is not None
        files = []
        for f in expand_inputs(src.path):
            name = f.rsplit("/", 1)[-1]
            if src.include and not (_matches(name, src.include) or _matches(f, src.include)):
                continue
            if _matches(name, src.exclude) or _matches(f, src.exclude):
                continue
            files.append(InputFile(f, f))
    if src.max_files is not None:
        files = files[: src.max_files]
    if not files:
        raise SourceError(f"source {src.label!r}: no input files after include/exclude; check the recipe")
    return files


def _size(path: str) -> int:
    try:
        return os.path.getsize(path) if path and "://" not in path else 0
    except OSError:
        return 0


def plan_tasks(recipe: Recipe) -> list[Task]:
    """All tasks of a recipe, in source order then file order."""
    tasks: list[Task] = []
    for si, src in enumerate(recipe.sources):
        group: list[InputFile] = []
        size = 0
        n = 0
        for f in _source_files(src):
            fsize = _size(f.path)
            if group and (len(group) >= MAX_TASK_FILES or size + fsize > MAX_TASK_BYTES):
                tasks.append(Task(f"s{si:02d}-t{n:05d}", si, tuple(group)))
                n += 1
                group, size = [], 0
            group.append(f)
            size += fsize
        if group:
            tasks.append(Task(f"s{si:02d}-t{n:05d}", si, tuple(group)))
    return tasks


def word_problem_items(src: SourceConfig) -> tuple[list[RawItem], str]:
    """The generated items of a ``word_problems`` source and the sha256 of their canonical JSONL."""
    from moeforge.data.synth import generate_word_problems

    uri = f"builtin://word_problems?count={src.count}&seed={src.seed}"
    items = list(generate_word_problems(src.count, src.seed))
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return [RawItem(data=it, uri=uri, line=i + 1) for i, it in enumerate(items)], h.hexdigest()


def iter_task_items(src: SourceConfig, inp: InputFile) -> Iterator[RawItem | Quarantined]:
    """Items of one input of a task (raw items or quarantined bad input), with the record-facing URI."""
    if src.builtin == "word_problems":
        yield from word_problem_items(src)[0]
    elif src.builtin == "pydoc_topics":
        import pydoc_data.topics as topics

        for i, key in enumerate(sorted(topics.topics)):
            yield RawItem(data=topics.topics[key], uri=f"pydoc://topics/{key}", offset=i)
    elif src.hf is not None:
        from moeforge.data.hf_source import iter_hf_items

        yield from iter_hf_items(src.hf)
    else:
        fmt = "txt" if src.builtin == "stdlib" else src.format
        mode = "file" if src.builtin == "stdlib" else src.txt_mode
        for item in read_source(inp.path, fmt, mode):
            if inp.uri != inp.path:
                item.uri = inp.uri
            yield item
