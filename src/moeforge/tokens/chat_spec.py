"""What an imported model's chat template does, in the terms moeforge renders chats: ChatML turns, and
whether the template opens a chat that has no system turn with a default one.

moeforge renders chats itself (:func:`moeforge.tokens.pack.render_chat`), turn by turn, so that training
masks and the server's injection-safe encoding know where every turn starts. An imported model brings
its own Jinja template; :func:`analyze_chat_template` renders it on probe conversations in a sandbox and
accepts it only when its output equals moeforge's ChatML — optionally preceded by a fixed system turn
when the chat has none (SmolLM2's template adds "You are a helpful AI assistant named SmolLM, …"). That
default system prompt is recorded in ``chat.json`` beside the tokenizer and applied by the trainer's SFT
rendering and the server, so both see exactly what the model's own template would produce. A template
that renders anything else is recorded as unsupported, with the first difference, and chat refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from moeforge.config import StrictModel
from moeforge.io import atomic_write_text
from moeforge.tokens.pack import IM_END, IM_START, render_chat

__all__ = ["CHAT_SPEC_FILE", "ChatSpec", "analyze_chat_template", "apply_default_system", "load_chat_spec"]

CHAT_SPEC_FILE = "chat.json"

_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


class ChatSpec(StrictModel):
    """How chats are rendered for a tokenizer: ``format`` 'chatml' (moeforge's renderer is exact) or
    'unsupported' (``reason`` says why); ``default_system_prompt`` opens chats that have no system turn."""

    format: str = Field(default="chatml", pattern="^(chatml|unsupported)$")
    default_system_prompt: str | None = None
    reason: str | None = None
    template_sha256: str | None = None

    def save(self, tokenizer_dir: str | os.PathLike[str]) -> Path:
        path = Path(tokenizer_dir) / CHAT_SPEC_FILE
        atomic_write_text(path, json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n")
        return path


def _render(template: str, messages: list[dict[str, str]], generation: bool) -> str:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    # the environment transformers' apply_chat_template uses, so templates render as they do there
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=generation, bos_token="", eos_token=""
    )


def _first_difference(a: str, b: str) -> str:
    i = next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at character {i}: template gives {a[i : i + 40]!r}, ChatML {b[i : i + 40]!r}"


def analyze_chat_template(template: str | None) -> ChatSpec:
    """The :class:`ChatSpec` of a Jinja chat template (None: plain ChatML, moeforge's own)."""
    if not template:
        return ChatSpec()
    digest = hashlib.sha256(template.encode()).hexdigest()
    try:
        outputs = [(m, _render(template, m, g)) for m in _PROBES for g in (False, True)]
    except Exception as exc:  # jinja raises TemplateError subclasses, and templates raise their own errors
        return ChatSpec(
            format="unsupported", reason=f"the template does not render: {exc}", template_sha256=digest
        )
    default: str | None = None
    plain = False  # a chat without a system turn rendered with no default system turn
    sometimes = ChatSpec(
        format="unsupported", reason="the default system turn is added only sometimes", template_sha256=digest
    )
    for n, (msgs, text) in enumerate(outputs):
        generation = n % 2 == 1
        want = render_chat(msgs) + (f"{IM_START}assistant\n" if generation else "")
        if text == want:
            if msgs[0]["role"] != "system":
                if default is not None:
                    return sometimes
                plain = True
            continue
        head = f"{IM_START}system\n"
        if msgs[0]["role"] != "system" and text.startswith(head) and text.endswith(want):
            prefix = text[: len(text) - len(want)]
            body = prefix[len(head) :]
            if body.endswith(f"{IM_END}\n") and IM_END not in body[: -len(IM_END) - 1]:
                found = body[: -len(IM_END) - 1]
                if plain:
                    return sometimes
                if default not in (None, found):
                    return ChatSpec(
                        format="unsupported",
                        reason="the default system prompt varies",
                        template_sha256=digest,
                    )
                default = found
                continue
        return ChatSpec(format="unsupported", reason=_first_difference(text, want), template_sha256=digest)
    return ChatSpec(default_system_prompt=default, template_sha256=digest)


def load_chat_spec(tokenizer_dir: str | os.PathLike[str] | None) -> ChatSpec:
    """The ``chat.json`` beside a tokenizer; plain ChatML when there is none (moeforge's own tokenizers)."""
    if tokenizer_dir is None:
        return ChatSpec()
    d = Path(tokenizer_dir)
    path = (d if d.is_dir() else d.parent) / CHAT_SPEC_FILE
    if not path.is_file():
        return ChatSpec()
    try:
        return ChatSpec.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(f"{path}: not a valid chat spec ({exc}); re-run `moeforge model import`") from exc


def apply_default_system(messages: list[dict[str, Any]], spec: ChatSpec) -> list[dict[str, Any]]:
    """``messages`` opened by the spec's default system turn when they have no system turn of their own."""
    if spec.default_system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": spec.default_system_prompt}, *messages]
