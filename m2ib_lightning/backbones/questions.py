"""Pictures and questions to model inputs through a Hugging Face processor, for VQA attribution runs.

The prompt is the processor's chat template around the question where the
processor has one (LLaVA), else the question itself (BLIP VQA); the processor
expands the image placeholder. Displays show the question's own words only:
the positions whose characters lie inside the question, found from the
tokenizer's offsets, so chat-template words and special tokens stay hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .base import HFPreprocessing, square_patch_grid


@dataclass(frozen=True)
class QuestionInputs:
    """One (picture, question): the image inputs the model takes (``pixel_values`` and what else the family
    needs), the prompt's ids, and which ids are the question's own words (shown in displays)."""

    image: dict[str, Tensor]
    ids: list[int]
    visible: list[bool]


class HFQuestions(HFPreprocessing):
    """Question preprocessing for the answer adapters whose processor takes ``images`` and ``text``."""

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Answers always; questions (VQA runs) when loaded with a processor (``from_pretrained``)."""
        return ("answers", *(("questions",) if self.processor is not None else ()))

    def prompt(self, question: str) -> str:
        """The text the processor receives: the chat template around the question, with an image placeholder."""
        processor = self._require_processor()
        if getattr(processor, "chat_template", None):
            message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(message, add_generation_prompt=True)
        return question

    def question_inputs(self, image: Any, question: str) -> QuestionInputs:
        processor = self._require_processor()
        prompt = self.prompt(question)
        encoded = processor(images=image, text=prompt, return_tensors="pt", return_offsets_mapping=True)
        ids = encoded["input_ids"][0].tolist()
        image_token = getattr(processor, "image_token", None)
        expanded = prompt
        if image_token and image_token in prompt:  # the processor repeated the placeholder once per image feature
            count = ids.count(processor.tokenizer.convert_tokens_to_ids(image_token))
            expanded = prompt.replace(image_token, image_token * count, 1)
        start = expanded.rfind(question)
        special = set(self.tokenizer.all_special_ids)
        if start < 0 or "offset_mapping" not in encoded:  # the question is not there verbatim: show every ordinary token
            visible = [i not in special for i in ids]
        else:
            end = start + len(question)
            visible = [a >= start and b <= end and b > a and i not in special
                       for i, (a, b) in zip(ids, encoded["offset_mapping"][0].tolist())]
        return QuestionInputs(self.image_part(encoded), ids, visible)

    def image_part(self, encoded: Any) -> dict[str, Tensor]:
        """One sample's image inputs from the processor's encoding: its (C, H, W) pixel values."""
        return {"pixel_values": encoded["pixel_values"][0]}

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """(rows, cols) of the square ViT's patches (CLS first: ``num_prefix_tokens``), for the baselines' maps."""
        return square_patch_grid(self.config, pixel_values)

    def answer_inputs(self, answer: str) -> list[int]:
        """An answer's ids as the model writes it (no special tokens)."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"answer {answer!r} has no tokens")
        return list(ids)

    def answer_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def join_inputs(self, images: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Several samples' image inputs as one batch's."""
        return {"pixel_values": torch.stack([image["pixel_values"] for image in images])}

    def sample_image(self, inputs: dict[str, Tensor], index: int) -> Tensor:
        """Sample ``index``'s (C, H, W) pixel values, for display."""
        return inputs["pixel_values"][index]
