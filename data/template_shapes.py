"""The chat template rendered once per conversation shape, not ~7 times per record.

`split_supervised` renders a conversation whole and each of its prefixes (twice per answer, and
once more to find a turn's end), so a 3-turn record costs ~7 renders of the chat template through
`apply_chat_template`: ~0.6 ms of CPU a record, a third of the data pass. Most templates insert
each message's content verbatim; for those, the rendering of any conversation is the rendering of
its shape (its roles, each content a numbered slot) with the contents put in the slots.
`ShapeRenders` renders each shape once and fills its slots. It is used for a conversation only
where the real rendering of the whole conversation equals the filled one (`fits`): a template
that trims, escapes or branches on a content falls back to rendering every prefix. The guard
checks the whole conversation, not each prefix: a template whose prefix renders differ from the
whole one's in a content-dependent way and yet render the whole verbatim would slip through
(tests/test_data_cache.py compares both paths' samples, and a template that branches on a content).
"""

from __future__ import annotations

import re

# Private-use characters: no chat template writes them, and a content holding one is not filled.
SLOT_OPEN, SLOT_CLOSE = "\ue000", "\ue001"
_SLOT = re.compile(f"{SLOT_OPEN}(\\d+){SLOT_CLOSE}")


def render_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _fillable(messages: list[dict]) -> bool:
    """Plain {role, content: str} messages whose contents hold no slot character."""
    return all(
        m.keys() == {"role", "content"} and isinstance(m["content"], str)
        and SLOT_OPEN not in m["content"] and SLOT_CLOSE not in m["content"]
        for m in messages
    )


class ShapeRenders:
    """`render_template` of a conversation by its shape's rendering with the contents filled in
    (`fits` says where it matches the real rendering). Holds the shapes of one batch of conversations."""

    def __init__(self):
        self.shapes: dict[tuple, list[str]] = {}  # (roles, generation prompt) -> literal, slot, literal, ...

    def _parts(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[str]:
        key = (tuple(m["role"] for m in messages), add_generation_prompt)
        parts = self.shapes.get(key)
        if parts is None:
            slotted = [{"role": m["role"], "content": f"{SLOT_OPEN}{k}{SLOT_CLOSE}"} for k, m in enumerate(messages)]
            parts = self.shapes[key] = _SLOT.split(render_template(tokenizer, slotted, add_generation_prompt))
        return parts

    def __call__(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
        """For a conversation `fits` accepted, its prefixes, and those with plain turns appended."""
        parts = self._parts(tokenizer, messages, add_generation_prompt)
        filled = parts[:]
        filled[1::2] = [messages[int(k)]["content"] for k in parts[1::2]]  # the split's odd items: slot numbers
        return "".join(filled)

    def fits(self, tokenizer, messages: list[dict]) -> bool:
        """Whether the filled shape renders the whole of `messages` as the template does (one real render)."""
        return _fillable(messages) and self(tokenizer, messages, False) == render_template(tokenizer, messages, False)
