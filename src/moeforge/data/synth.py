"""Synthetic GSM8K-style grade-school math word problems for the built-in demo dataset.

The demo recipe needs math data that exists on a fresh machine without downloads, so this module
writes word problems in the shape of GSM8K (Cobbe et al. 2021): ``{"question": ..., "answer": ...}``
where the answer reasons step by step, each arithmetic step carries a calculator annotation such as
``48/2 = <<48/2=24>>24``, and the last line is ``#### 24``.

Every number is an integer: parameters are chosen so that each division is exact, and each step's
value is computed from the very expression written into the annotation, so the text cannot drift
from the arithmetic. The final ``#### N`` is the value of the last step.

Determinism: ``generate_word_problems(n, seed)`` draws from one private ``random.Random(seed)``, never
the global random state, and consumes it item by item; the same ``(n, seed)`` always gives the same
items, and the first ``k`` items for any ``n >= k`` equal the items for ``n = k``.
"""

from __future__ import annotations

import ast
import logging
import operator
import random
from collections.abc import Callable, Iterator

__all__ = ["TEMPLATE_NAMES", "generate_word_problems"]

log = logging.getLogger(__name__)

_HER = ["Natalia", "Maya", "Priya", "Sofia", "Amara", "Lena", "Chloe", "Fatima", "Hana", "Isabel", "Julia",
        "Keiko", "Lucia", "Nora", "Olivia", "Rosa", "Tara", "Zoe", "Mei", "Ingrid"]  # fmt: skip
_HIM = ["James", "Omar", "Diego", "Kenji", "Lucas", "Mateo", "Noah", "Ravi", "Samuel", "Tomas", "Yusuf",
        "Arjun", "Ben", "Carlos", "David", "Elijah", "Felix", "Hugo", "Ivan", "Kwame"]  # fmt: skip
_ITEMS = ["notebooks", "pencils", "apples", "oranges", "stickers", "comic books", "muffins", "bracelets",
          "water bottles", "toy cars", "cupcakes", "markers", "socks", "candles", "mugs"]  # fmt: skip
_SWEETS = ["candies", "cookies", "marbles", "stickers", "grapes", "crayons", "beads", "cards"]
_VEHICLES = [("car", 40, 90), ("train", 60, 120), ("bus", 30, 70), ("cyclist", 10, 25), ("boat", 15, 40)]
_FOODS = ["pancakes", "muffins", "cookies", "banana bread", "scones", "bread rolls", "waffles", "brownies"]
_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,
}


def _evaluate(expr: str) -> int:
    """Evaluate an annotation expression (integers, ``+ - * /``, parentheses); ``/`` must be exact."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if not isinstance(node.op, ast.Div) or (b != 0 and a % b == 0):
                return _OPS[type(node.op)](a, b)
        raise ValueError(f"synth: {expr!r} is not exact integer arithmetic")

    return ev(ast.parse(expr, mode="eval").body)


class _Work:
    """The solution being written: each ``calc`` evaluates its expression and appends an annotated line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.value = 0

    def calc(self, before: str, expr: str, after: str = "", money: bool = False) -> int:
        self.value = _evaluate(expr)
        sign = "$" if money else ""
        self.lines.append(f"{before}{expr} = {sign}<<{expr}={self.value}>>{self.value}{after}")
        return self.value

    def answer(self) -> str:
        return "\n".join([*self.lines, f"#### {self.value}"])


def _person(rng: random.Random) -> tuple[str, str, str]:
    """A name with its subject and possessive pronouns."""
    if rng.random() < 0.5:
        return rng.choice(_HER), "she", "her"
    return rng.choice(_HIM), "he", "his"


def _shopping(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    item1, item2 = rng.sample(_ITEMS, 2)
    q1, p1, q2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    a = w.calc(f"The {item1} cost ", f"{q1}*{p1}", ".", money=True)
    b = w.calc(f"The {item2} cost ", f"{q2}*{p2}", ".", money=True)
    total = w.calc(f"Altogether {name} spent ", f"{a}+{b}", ".", money=True)
    bill = next(x for x in (50, 100, 200, 300) if x >= total)
    w.calc(f"{name} gets back ", f"{bill}-{total}", " in change.", money=True)
    return (
        f"{name} buys {q1} {item1} for ${p1} each and {q2} {item2} for ${p2} each. If {she} pays with "
        f"a ${bill} bill, how much change does {she} get back?"
    )


def _speed(rng: random.Random, w: _Work) -> str:
    vehicle, lo, hi = rng.choice(_VEHICLES)
    speed, t1, t2 = rng.randint(lo, hi), rng.randint(2, 6), rng.randint(2, 9)
    s = w.calc(f"The {vehicle} travels ", f"{speed * t1}/{t1}", " kilometers per hour.")
    w.calc(f"In {t2} hours it travels ", f"{s}*{t2}", " kilometers.")
    return (
        f"A {vehicle} travels {speed * t1} kilometers in {t1} hours. At the same speed, how many "
        f"kilometers will it travel in {t2} hours?"
    )


def _sharing(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    themself = "herself" if she == "she" else "himself"
    thing, friends = rng.choice(_SWEETS), rng.randint(2, 8)
    bags, per_bag = rng.randint(2, 9), rng.randint(5, 40)
    # keep at least one and leave a multiple of `friends` (>= 10 items, <= 8 friends, so one always fits)
    first = (bags * per_bag) % friends or friends
    kept = first + friends * rng.randint(0, min(3, (bags * per_bag - 1 - first) // friends))
    total = w.calc(f"{name} has ", f"{bags}*{per_bag}", f" {thing}.")
    rest = w.calc(f"After keeping {kept}, there are ", f"{total}-{kept}", f" {thing} to share.")
    w.calc("Each friend gets ", f"{rest}/{friends}", f" {thing}.")
    return (
        f"{name} has {bags} bags with {per_bag} {thing} in each bag. {she.capitalize()} keeps {kept} "
        f"for {themself} and shares the rest equally among {friends} friends. How many {thing} does "
        "each friend get?"
    )


def _discount(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    item = rng.choice(["jacket", "backpack", "lamp", "board game", "pair of shoes", "bike helmet", "watch"])
    price, pct, qty = 20 * rng.randint(2, 15), 5 * rng.randint(1, 10), rng.randint(2, 5)
    off = w.calc("The discount is ", f"{price}*{pct}/100", " per item.", money=True)
    sale = w.calc("Each item costs ", f"{price}-{off}", " after the discount.", money=True)
    w.calc(f"{name} pays ", f"{qty}*{sale}", " in total.", money=True)
    return (
        f"A {item} costs ${price}. The store offers a {pct}% discount. If {name} buys {qty} of them, "
        f"how much does {she} pay?"
    )


def _ages(rng: random.Random, w: _Work) -> str:
    kid, parent = rng.sample(_HER + _HIM, 2)
    age, times, years = rng.randint(3, 14), rng.randint(2, 4), rng.randint(2, 12)
    p = w.calc(f"{parent} is ", f"{age}*{times}", " years old.")
    k2 = w.calc(f"In {years} years {kid} will be ", f"{age}+{years}", ".")
    p2 = w.calc(f"In {years} years {parent} will be ", f"{p}+{years}", ".")
    w.calc("The sum of their ages will be ", f"{k2}+{p2}", ".")
    return (
        f"{kid} is {age} years old. {parent} is {times} times as old as {kid}. What will be the sum of "
        f"their ages in {years} years?"
    )


def _fence(rng: random.Random, w: _Work) -> str:
    name, _, her = _person(rng)
    length, width, cost = rng.randint(5, 40), rng.randint(3, 25), rng.randint(2, 12)
    perim = w.calc("The perimeter is ", f"2*({length}+{width})", " meters.")
    w.calc("The fence costs ", f"{perim}*{cost}", ".", money=True)
    return (
        f"{name}'s garden is a rectangle {length} meters long and {width} meters wide. Fencing costs "
        f"${cost} per meter. How much will it cost to fence all around {her} garden?"
    )


def _tiles(rng: random.Random, w: _Work) -> str:
    room = rng.choice(["kitchen", "bathroom", "hallway", "classroom", "patio"])
    per_box, price = rng.choice([2, 3, 4, 5, 6]), rng.randint(8, 30)
    width = rng.randint(3, 12)
    length = per_box * rng.randint(1, 6)
    area = w.calc(f"The {room} floor is ", f"{length}*{width}", " square meters.")
    boxes = w.calc("They need ", f"{area}/{per_box}", " boxes of tiles.")
    w.calc("The tiles cost ", f"{boxes}*{price}", ".", money=True)
    return (
        f"A {room} floor measures {length} meters by {width} meters. One box of tiles covers {per_box} "
        f"square meters and costs ${price}. How much do the tiles for the whole floor cost?"
    )


def _savings(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    goal_item = rng.choice(["bicycle", "video game", "guitar", "tablet", "pair of skates", "telescope"])
    have, per_week, weeks = rng.randint(5, 60), rng.randint(3, 25), rng.randint(3, 20)
    price = have + per_week * weeks
    need = w.calc(f"{name} still needs ", f"{price}-{have}", ".", money=True)
    w.calc(f"Saving ${per_week} a week, it takes ", f"{need}/{per_week}", " weeks.")
    return (
        f"{name} wants a {goal_item} that costs ${price}. {she.capitalize()} has already saved ${have} "
        f"and saves ${per_week} every week. How many weeks until {she} can buy it?"
    )


def _recipe(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    food, serves = rng.choice(_FOODS), rng.randint(2, 6)
    flour, sugar, factor = rng.randint(1, 5), rng.randint(1, 4), rng.randint(2, 8)
    k = w.calc("The recipe must be made ", f"{serves * factor}/{serves}", " times.")
    f = w.calc(f"{name} needs ", f"{k}*{flour}", " cups of flour.")
    s = w.calc(f"{name} needs ", f"{k}*{sugar}", " cups of sugar.")
    w.calc("Altogether that is ", f"{f}+{s}", " cups.")
    return (
        f"A recipe for {food} serves {serves} people and uses {flour} cups of flour and {sugar} cups of "
        f"sugar. {name} wants to serve {serves * factor} people. How many cups of flour and sugar does "
        f"{she} need altogether?"
    )


def _wages(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    job = rng.choice(["babysitting", "tutoring", "walking dogs", "washing cars", "mowing lawns"])
    wage, hours, days = rng.randint(8, 25), rng.randint(2, 6), rng.randint(2, 6)
    spent = rng.randint(5, wage * hours * days - 1)
    day = w.calc(f"Each day {name} earns ", f"{wage}*{hours}", ".", money=True)
    total = w.calc(f"In {days} days {she} earns ", f"{day}*{days}", ".", money=True)
    w.calc(f"{name} has ", f"{total}-{spent}", " left.", money=True)
    return (
        f"{name} earns ${wage} an hour {job}. {she.capitalize()} works {hours} hours a day for {days} "
        f"days and then spends ${spent} on a gift. How much money does {she} have left?"
    )


def _reading(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    first = rng.randint(5, 30)
    pages = 3 * first + 2 * rng.randint(5, 60)
    second = w.calc(f"Today {name} read ", f"{first}*2", " pages.")
    read = w.calc("So far that is ", f"{first}+{second}", " pages.")
    left = w.calc("There are ", f"{pages}-{read}", " pages left.")
    w.calc(f"Tomorrow {she} should read ", f"{left}/2", " pages.")
    return (
        f"{name} is reading a {pages}-page book. Yesterday {she} read {first} pages, and today {she} "
        f"read twice as many. If {she} wants to read half of the remaining pages tomorrow, how many "
        f"pages should {she} read?"
    )


def _school(rng: random.Random, w: _Work) -> str:
    school = rng.choice(["Maple", "Riverside", "Oakwood", "Hillcrest", "Lakeview", "Sunnyvale"])
    k, pct = rng.randint(2, 6), rng.choice([25, 50, 75])
    students = k * 4 * rng.randint(5, 40)
    bus = w.calc("", f"{students}/{k}", " students take the bus.")
    rest = w.calc("", f"{students}-{bus}", " students do not.")
    w.calc("", f"{rest}*{pct}/100", " students walk.")
    return (
        f"{school} School has {students} students. One in every {k} students takes the bus, and {pct}% "
        "of the others walk. How many students walk to school?"
    )


def _farm(rng: random.Random, w: _Work) -> str:
    name, _, _ = _person(rng)
    hens, cows, ducks = rng.randint(3, 40), rng.randint(2, 20), rng.randint(2, 30)
    a = w.calc("The chickens have ", f"{hens}*2", " legs.")
    b = w.calc("The cows have ", f"{cows}*4", " legs.")
    c = w.calc("The ducks have ", f"{ducks}*2", " legs.")
    w.calc("Altogether there are ", f"{a}+{b}+{c}", " legs.")
    return (
        f"{name}'s farm has {hens} chickens, {cows} cows and {ducks} ducks. How many legs do the "
        "animals have altogether?"
    )


def _store(rng: random.Random, w: _Work) -> str:
    item = rng.choice(_ITEMS)
    monday, delivered = rng.randint(5, 40), rng.randint(10, 80)
    stock = 3 * monday + rng.randint(0, 100)
    tuesday = w.calc("On Tuesday the store sold ", f"{monday}*2", f" {item}.")
    sold = w.calc("In the two days it sold ", f"{monday}+{tuesday}", f" {item}.")
    left = w.calc("Before the delivery it had ", f"{stock}-{sold}", f" {item}.")
    w.calc("After the delivery it has ", f"{left}+{delivered}", f" {item}.")
    return (
        f"A store had {stock} {item}. It sold {monday} on Monday and twice as many on Tuesday. On "
        f"Wednesday a delivery brought {delivered} more. How many {item} does the store have now?"
    )


def _ribbon(rng: random.Random, w: _Work) -> str:
    name, she, _ = _person(rng)
    piece, per_gift = rng.choice([10, 20, 25, 50]), rng.randint(2, 5)
    gifts = rng.randint(2, 30)
    meters = piece * per_gift * gifts
    while meters % 100:
        gifts += 1
        meters = piece * per_gift * gifts
    cm = w.calc("The ribbon is ", f"{meters // 100}*100", " centimeters long.")
    pieces = w.calc(f"{name} cuts ", f"{cm}/{piece}", " pieces.")
    w.calc(f"{she.capitalize()} can wrap ", f"{pieces}/{per_gift}", " gifts.")
    return (
        f"{name} has a ribbon {meters // 100} meters long. {she.capitalize()} cuts it into pieces of "
        f"{piece} centimeters, and each gift needs {per_gift} pieces. How many gifts can {she} wrap?"
    )


_TEMPLATES: dict[str, Callable[[random.Random, _Work], str]] = {
    "shopping": _shopping, "speed": _speed, "sharing": _sharing, "discount": _discount, "ages": _ages,
    "fence": _fence, "tiles": _tiles, "savings": _savings, "recipe": _recipe, "wages": _wages,
    "reading": _reading, "school": _school, "farm": _farm, "store": _store, "ribbon": _ribbon,
}  # fmt: skip
TEMPLATE_NAMES: tuple[str, ...] = tuple(_TEMPLATES)


def _generate(n: int, seed: int) -> Iterator[tuple[str, dict[str, str]]]:
    """Like :func:`generate_word_problems`, but each item comes with the name of its template."""
    rng = random.Random(seed)
    log.debug("generating %d word problems with seed %d", n, seed)
    for _ in range(n):
        name = rng.choice(TEMPLATE_NAMES)
        work = _Work()
        question = _TEMPLATES[name](rng, work)
        yield name, {"question": question, "answer": work.answer()}


def generate_word_problems(n: int, seed: int) -> Iterator[dict[str, str]]:
    """Yield ``n`` GSM8K-style problems as ``{"question": str, "answer": str}``.

    Deterministic in ``(n, seed)`` and prefix-stable: the first ``k`` items do not depend on ``n``.
    Raises ``ValueError`` at call time if ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"generate_word_problems: n must be >= 0, got {n}")
    return (problem for _, problem in _generate(n, seed))
