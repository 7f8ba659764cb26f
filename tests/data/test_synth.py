"""Synthetic GSM8K-style word problems: deterministic, prefix-stable, varied, and arithmetically correct."""

from __future__ import annotations

import ast
import re
from collections import Counter
from itertools import islice

import pytest

from moeforge.data import synth
from moeforge.data.synth import TEMPLATE_NAMES, generate_word_problems

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>(\d*)")
FINAL = re.compile(r"\n#### (-?\d+)\Z")


def _exact_eval(expr: str) -> int:
    """Evaluate integers with + - * / and parentheses; a division must be exact. No ``eval``."""
    assert re.fullmatch(r"[0-9+\-*/() ]+", expr), f"unexpected characters in {expr!r}"

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        assert isinstance(node, ast.BinOp), f"unsupported syntax in {expr!r}"
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        assert isinstance(node.op, ast.Div), f"unsupported operator in {expr!r}"
        assert b != 0 and a % b == 0, f"inexact division {a}/{b} in {expr!r}"
        return a // b

    return ev(ast.parse(expr, mode="eval").body)


def test_same_seed_gives_same_items_and_different_seed_gives_different_items():
    first = list(generate_word_problems(50, seed=7))
    assert first == list(generate_word_problems(50, seed=7))
    assert first != list(generate_word_problems(50, seed=8))


def test_generation_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    list(generate_word_problems(20, seed=1))
    assert random.random() == expected


def test_first_k_items_are_the_same_whatever_n_is():
    long = list(generate_word_problems(200, seed=3))
    for k in (0, 1, 17, 199):
        assert list(generate_word_problems(k, seed=3)) == long[:k]
    assert list(islice(generate_word_problems(10_000, seed=3), 50)) == long[:50]


def test_items_have_question_and_answer_strings():
    for item in generate_word_problems(100, seed=0):
        assert set(item) == {"question", "answer"}
        assert item["question"].endswith("?")
        assert all(isinstance(v, str) and v for v in item.values())


def test_every_annotation_evaluates_to_its_value_and_the_final_answer_is_the_last_step():
    for item in generate_word_problems(2_000, seed=11):
        answer = item["answer"]
        steps = ANNOTATION.findall(answer)
        assert steps, answer
        for expr, value, shown in steps:
            assert _exact_eval(expr) == int(value), answer
            assert shown == value, answer
            assert int(value) >= 0, answer
        final = FINAL.search(answer)
        assert final is not None, answer
        assert int(final.group(1)) == int(steps[-1][1])
        assert answer.count("####") == 1


def test_all_templates_appear_in_500_problems():
    seen = Counter(name for name, _ in synth._generate(500, seed=0))
    assert set(seen) == set(TEMPLATE_NAMES)
    assert len(TEMPLATE_NAMES) >= 12


def test_fewer_than_one_percent_duplicate_questions_in_2000():
    questions = [item["question"] for item in generate_word_problems(2_000, seed=5)]
    duplicates = len(questions) - len(set(questions))
    assert duplicates < 20


def test_zero_items_yields_nothing():
    assert list(generate_word_problems(0, seed=0)) == []


def test_negative_n_raises_value_error():
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_word_problems(-1, seed=0)
