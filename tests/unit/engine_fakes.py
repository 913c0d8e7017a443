"""Stand-ins for the engine's prompt side in unit tests: one "token" per UTF-8 byte."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def byte_tokens(text: str) -> list[int]:
    return list(text.encode())


def render_turns(messages: Sequence[Mapping[str, str]], chat_template: str | None) -> str:
    """A readable stand-in for a chat template: `<role>content` per turn, then the generation
    prompt; a given template is put in front so tests can see it was passed."""
    turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    return f"{chat_template or ''}{turns}<assistant>"


def byte_chat(messages: Sequence[Mapping[str, str]], chat_template: str | None) -> list[int]:
    return byte_tokens(render_turns(messages, chat_template))
