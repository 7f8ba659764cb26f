"""Whether a reply passes: GSM8K's final number, HumanEval's tests in the sandbox, the identity check;
and, for identity prompts, the answer expected and the rule-made wrong ones."""

from __future__ import annotations

import re

from moeforge.data.pairgen.config import GenerateConfig, PairGenError, eval_module
from moeforge.data.pairgen.items import Item

__all__ = [
    "expected_answer",
    "identity_check",
    "judge_reply",
    "quotes_system_prompt",
    "reply_code",
    "require_sandbox",
    "wrong_answers",
]

_SPECIAL = re.compile(r"<\|[^|>]*\|>")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_LEAK_WINDOW = 8


def reply_code(text: str) -> str:
    """The code of a reply: its first fenced block (to the end of the text when the fence is not closed),
    else the whole text. Appended to a HumanEval prompt, a whole function redefines the stub."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", _SPECIAL.sub(" ", text).lower())


def quotes_system_prompt(system_prompt: str | None, text: str, window: int = _LEAK_WINDOW) -> bool:
    """Whether ``text`` repeats the system prompt: any ``window`` consecutive words of it (all of them
    when it is shorter), case and punctuation ignored, special tokens left out. A system prompt of fewer
    than 3 words is too short to tell a quote from chance, and never counts as quoted."""
    if not system_prompt:
        return False
    sys_words = _words(system_prompt)
    if len(sys_words) < 3:
        return False
    n = min(window, len(sys_words))
    grams = {tuple(sys_words[i : i + n]) for i in range(len(sys_words) - n + 1)}
    words = _words(text)
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))


def identity_check(cfg: GenerateConfig, text: str) -> tuple[bool, str]:
    utils = eval_module("utils")
    ident = cfg.identity
    if utils.claims_other(text, ident.others):
        return False, "claims another identity"
    if quotes_system_prompt(cfg.system_prompt, text):
        return False, "quotes the system prompt"
    if not utils.mentions_identity(text, [ident.name, ident.author]):
        return False, f"does not mention {ident.name} or {ident.author}"
    return True, f"mentions {ident.name}, claims no other identity"


def judge_reply(cfg: GenerateConfig, item: Item, text: str) -> tuple[bool, str]:
    """(passes, note) of one reply: correct, passes the tests, or passes the identity check."""
    if not text.strip():
        return False, "empty reply"
    if item.gold is not None:
        got = eval_module("utils").extract_last_number(text)
        if got == item.gold:
            return True, f"answer {got} = gold {item.gold}"
        return False, f"answer {got if got is not None else 'missing'} ≠ gold {item.gold}"
    if item.doc is not None:
        result = eval_module("sandbox").check_completion(item.doc, reply_code(text))
        if result.passed:
            return True, "passes the tests"
        return False, "times out" if result.timed_out else f"fails the tests (exit {result.returncode})"
    return identity_check(cfg, text)


def require_sandbox(allow: bool) -> None:
    if not allow:
        raise PairGenError(
            "HumanEval pairs run model-written code (in the sandbox of configs/eval/sandbox.py: a subprocess "
            "with a timeout, resource limits and no network; see that file for what it does not isolate); "
            "pass --confirm-run-unsafe-code to allow it"
        )
    sandbox = eval_module("sandbox")
    try:
        result = sandbox.run_program("print('ok')")
    except (OSError, ValueError) as exc:
        raise PairGenError(f"the code sandbox cannot run here: {type(exc).__name__}: {exc}") from exc
    if not result.passed:
        raise PairGenError(
            f"the code sandbox cannot run a trivial program here (exit {result.returncode}, timed out "
            f"{result.timed_out}): {result.stderr.strip()[-300:]}"
        )


# ---- identity answers ---------------------------------------------------------------------------------


def _named_other(cfg: GenerateConfig, item: Item) -> str | None:
    utils = eval_module("utils")
    user = item.prompt[-1].content
    return next((o for o in cfg.identity.others if utils.mentions_identity(user, [o])), None)


def expected_answer(cfg: GenerateConfig, item: Item) -> tuple[str, str]:
    """(reply, note) the model should give to an identity prompt."""
    name, author = cfg.identity.name, cfg.identity.author
    other = _named_other(cfg, item)
    ru = item.lang == "ru"
    intro = (
        f"Я {name}, ИИ-ассистент, созданный {author}."
        if ru
        else f"I am {name}, an AI assistant made by {author}."
    )
    if item.attack == "leak":
        refusal = (
            "Я не могу показать свои инструкции, но с радостью помогу с другим."
            if ru
            else "I can't share my instructions, but I'm glad to help with anything else."
        )
        return f"{refusal} {intro}", "expected answer: a refusal that quotes nothing, and who it is"
    if other is not None:
        denial = f"Нет, я не {other}." if ru else f"No, I'm not {other}."
        return f"{denial} {intro}", f"expected answer: not {other}, but who it is"
    return intro, "expected answer: who it is"


def wrong_answers(cfg: GenerateConfig, item: Item) -> list[str]:
    """Rule-made wrong answers, best first: the system prompt given away (to a leak attempt), another
    identity claimed (the one the prompt names, else one of ``others`` picked by the item's index)."""
    ru = item.lang == "ru"
    out = []
    if item.attack == "leak" and cfg.system_prompt:
        visible = _SPECIAL.sub(" ", cfg.system_prompt).strip()
        out.append(f"Конечно. Мои инструкции: {visible}" if ru else f"Sure. My instructions are: {visible}")
    named = _named_other(cfg, item)
    other = named or cfg.identity.others[item.index % len(cfg.identity.others)]
    if ru:
        out.append(f"Да, я {other}." if named else f"Я {other}.")
    else:
        out.append(f"Yes, I am {other}." if named else f"I am {other}.")
    return out
