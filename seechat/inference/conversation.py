"""A multi-turn conversation with a model: the state `seechat chat` keeps between questions."""
from __future__ import annotations

from typing import Any, Callable

from PIL import Image

from seechat.data import load_image
from seechat.models.base import SeeChatVLM
from seechat.models.prompting import ImageLike, reply, user_text


class Conversation:
    """A multi-turn chat: images added with `add_image` attach to the next user turn."""

    def __init__(self, model: "SeeChatVLM", system: str | None = None):
        self.model = model
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = [{"from": "system", "value": self.system}] if self.system else []
        self.images: list[Image.Image] = []
        self.pending: list[Image.Image] = []

    def add_image(self, image: ImageLike) -> None:
        """Decode now, so that a bad file is reported when it is added, not mid-answer."""
        self.pending.append(load_image(image))

    def ask(self, prompt: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
            **sampling: Any) -> str:
        turn = {"from": "human", "value": user_text(prompt, len(self.pending))}
        images = self.images + self.pending
        text = reply(self.model, self.turns + [turn], images, max_new_tokens, on_text, **sampling).text
        self.turns += [turn, {"from": "gpt", "value": text}]
        self.images, self.pending = images, []
        return text
