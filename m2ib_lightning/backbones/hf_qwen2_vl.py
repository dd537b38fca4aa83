"""Adapter for Hugging Face ``transformers.Qwen2VLForConditionalGeneration``: M2IB explains the answer.

The prompt-then-answer layout is :mod:`~m2ib_lightning.backbones.decoder`'s. What is Qwen2-VL's own:
- its processor does not resize to a square: ``pixel_values`` are the flattened patches of every image of
  the batch, one after the other, and ``image_grid_thw`` (images, 3) each image's (1, rows, cols) grid;
- the vision transformer runs on that packed sequence (each image attends to itself only), its patches in
  2x2 merge windows (block-major), and a merger folds each window into one language-model token;
- the language model places text and image tokens with 3-D rotary positions (``get_rope_index``), computed
  once from the laid-out sequence and reused by every pass.
The image bottleneck sits on a vision block's output at every patch of that sample (the other samples' packed
rows untouched); the map goes back from the window order to the image's own (rows, cols) grid.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import AnswerBatch, ImageGeometry, ImageLayout, Modality, resolve_layer
from .capabilities import Site
from .decoder import LANGUAGE_SITES, VISION_SITES, HFDecoderAnswerer
from .loading import load_pretrained
from .questions import HFQuestions


def is_hf_qwen2_vl(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return (getattr(getattr(model, "config", None), "model_type", None) == "qwen2_vl" and hasattr(model, "lm_head")
            and (hasattr(inner, "visual") or hasattr(model, "visual")))


def window_cells(rows: int, cols: int, merge: int) -> Tensor:
    """Each packed patch's raster cell on the (rows, cols) grid: the processor lays patches out merge window by
    merge window (``merge`` x ``merge`` neighbours in a row), windows in raster order."""
    grid = torch.arange(rows * cols).view(rows // merge, merge, cols // merge, merge)
    return grid.permute(0, 2, 1, 3).flatten()


@functools.cache
def image_processor_class() -> type:
    """Qwen2-VL's processor without its video part: the same images, text and image-token expansion (questions are
    about images; the video processor needs torchvision, which not every machine has)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageQwen2VLProcessor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's image processor resizes a picture to (its ``smart_resize``)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen_resize
    except ImportError:  # transformers 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen_resize

    return qwen_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def unpack_patches(patches: Tensor, rows: int, cols: int, merge: int, patch: int, temporal: int, channels: int = 3) -> Tensor:
    """One image's packed (rows * cols, channels * temporal * patch * patch) pixel values back to (channels, H, W): the
    inverse of the processor's window-by-window flattening (the first of the temporal copies)."""
    x = patches.reshape(rows // merge, cols // merge, merge, merge, channels, temporal, patch, patch)
    x = x.permute(5, 4, 0, 2, 6, 1, 3, 7)  # (temporal, channels, rows/m, m, patch, cols/m, m, patch)
    return x.reshape(temporal, channels, rows * patch, cols * patch)[0]


def pack_pictures(pictures: Tensor, merge: int, patch: int, temporal: int) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) pictures of one size packed as Qwen2-VL's processor packs them (each picture fills its temporal
    patch ``temporal`` times, patches window by window): (B * rows * cols, C * temporal * patch * patch) pixel values
    and the (B, 3) ``image_grid_thw``. Differentiable, so methods that perturb or differentiate pictures run on it."""
    b, c, h, w = pictures.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"pictures of {h}x{w} px: each side must be a multiple of patch_size x spatial_merge_size "
                         f"= {patch * merge} (Qwen2-VL's processor resizes them so)")
    rows, cols = h // patch, w // patch
    frames = pictures[:, None].expand(b, temporal, c, h, w)
    x = frames.reshape(b, temporal, c, rows // merge, merge, patch, cols // merge, merge, patch)
    packed = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(b * rows * cols, c * temporal * patch * patch)
    grid = torch.tensor([[1, rows, cols]], device=pictures.device).expand(b, 3).clone()
    return packed, grid


class HFQwen2VLAnswerer(HFQuestions, HFDecoderAnswerer):
    """Runs a ``Qwen2VLForConditionalGeneration`` on prompts and answers, with bottlenecks placed by the M2IB fit;
    loaded with its processor (images only), it also prepares questions for VQA runs."""

    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    #: a batch's pixel values are packed patches, not one (C, H, W) picture per sample
    packs_images = True

    def __init__(self, model: nn.Module, processor: Any = None):
        if not is_hf_qwen2_vl(model):
            raise TypeError(f"HFQwen2VLAnswerer wraps a transformers Qwen2VLForConditionalGeneration, got {type(model).__name__}")
        self.module, self.processor, self.config = model, processor, model.config
        self.merge = self.config.vision_config.spatial_merge_size
        self.patch = self.config.vision_config.patch_size

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_hf_qwen2_vl(model)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (*super().capabilities, "answer_attention", "probing")

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, hub: Any = None) -> "HFQwen2VLAnswerer":
        """The model and its processor's image and text parts (:func:`image_processor_class`)."""
        from transformers import Qwen2VLForConditionalGeneration

        return cls(*load_pretrained(Qwen2VLForConditionalGeneration, name_or_path, hub, image_processor_class()))

    # ------------------------------------------------------------------ probing
    #: the language model's layers, and the vision transformer's blocks (the merger reads the last one's output)
    probe_towers = ("language", "vision")

    def probe_sites(self, tower: str) -> tuple[str, ...]:
        return VISION_SITES if tower == "vision" else LANGUAGE_SITES

    def probe_site(self, tower: str, name: str, layer: int) -> Site:
        """Vision sites see the packed patches of every row one after another (``packed``); a head is dimensions
        [h*d, (h+1)*d) of ``proj``'s input, where the attention's per-image outputs are joined head by head."""
        if tower != "vision":
            return super().probe_site(tower, name, layer)
        block = self.blocks("image")[layer]
        if name == "resid":
            return Site(block, "output", packed=True)
        if name == "mlp":
            return Site(block.mlp, "output", packed=True)
        if name in ("self_attn", "self_head"):
            attention = block.attn
            return Site(attention.proj, "input", attention.num_heads if name == "self_head" else None, packed=True)
        raise ValueError(f"site {name!r} is not one of the vision tower's {self.probe_sites(tower)}")

    def image_keys(self, tower: str, inputs: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """The prompt's image tokens (language model: one per merge window), or the vision transformer's patches,
        from window order back to the raster order of the image's patch grid."""
        if tower != "vision":
            return super().image_keys(tower, inputs)
        _, rows, cols = inputs["image_grid_thw"][0].tolist()
        return torch.argsort(window_cells(rows, cols, self.merge)), (rows, cols)

    def head_attention(self, tower: str, inputs: dict[str, Tensor]) -> list[Tensor]:
        """Language model: as for every decoder. Vision transformer: its attention returns no probabilities, so each
        block's are rebuilt from what its attention reads (queries and keys of ``qkv``, the 2-D rotary positions):
        softmax(q k^T / sqrt(d)) over the sample's one image (in float32 at least, as the eager path)."""
        if tower != "vision":
            return super().head_attention(tower, inputs)
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        probs: list[Tensor] = []

        def rebuild(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rotary = kwargs.get("position_embeddings")
            if rotary is None:
                raise RuntimeError("Qwen2-VL's vision attention was called without position_embeddings (transformers "
                                   "< 5 passes rotary_pos_emb): its head attention cannot be rebuilt")
            q, k, _ = module.qkv(hidden).reshape(len(hidden), 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
            scores = torch.einsum("qhd,khd->hqk", q, k) * module.scaling
            probs.append(torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)[None])

        handles = [block.attn.register_forward_pre_hook(rebuild, with_kwargs=True) for block in self.blocks("image")]
        try:
            with torch.no_grad():
                self.decision_logits(inputs, 1, tower)
        finally:
            for handle in handles:
                handle.remove()
        return probs

    # ------------------------------------------------------------------ questions
    def image_part(self, encoded: Any) -> dict[str, Tensor]:
        """One image's packed patches and its (1, rows, cols) grid."""
        return {"pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]}

    def join_inputs(self, images: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Several images' patches packed one after the other, with their grids."""
        return {"pixel_values": torch.cat([image["pixel_values"] for image in images]),
                "image_grid_thw": torch.cat([image["image_grid_thw"] for image in images])}

    def sample_image(self, inputs: dict[str, Tensor], index: int) -> Tensor:
        """Image ``index``'s (3, H, W) pixel values at the size the processor resized it to."""
        grids = inputs["image_grid_thw"]
        counts = self._patch_counts(grids)
        start = sum(counts[:index])
        _, rows, cols = grids[index].tolist()
        return unpack_patches(inputs["pixel_values"][start:start + counts[index]], rows, cols, self.merge, self.patch,
                              self.config.vision_config.temporal_patch_size)

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """(rows, cols) of one image's patches, from its (3, H, W) pixel values."""
        return pixel_values.shape[-2] // self.patch, pixel_values.shape[-1] // self.patch

    def language_image_grid(self, inputs: dict[str, Tensor]) -> tuple[int, int]:
        """One language-model token per 2x2 merge window, windows in raster order."""
        _, rows, cols = inputs["image_grid_thw"][0].tolist()
        return rows // self.merge, cols // self.merge

    def raster_patches(self, tokens: Tensor, pixel_values: Tensor) -> Tensor:
        """A vision block's packed (patches, ...) values for (B, 3, H, W) pictures of one size -> (B, rows * cols, ...)
        in raster order (the baselines' maps)."""
        rows, cols = self.patch_grid(pixel_values)
        order = torch.argsort(window_cells(rows, cols, self.merge)).to(tokens.device)  # raster cell -> packed position
        return tokens.reshape(len(pixel_values), rows * cols, *tokens.shape[1:])[:, order]

    def image_geometry(self, image: Any) -> ImageGeometry:
        """The processor's resize (each side a multiple of patch x merge, the pixel count within its bounds, the
        aspect ratio kept), no crop: maps go back onto the original picture."""
        config = self._require_processor().image_processor
        size = getattr(config, "size", None) or {}
        low = size.get("shortest_edge", getattr(config, "min_pixels", 56 * 56))
        high = size.get("longest_edge", getattr(config, "max_pixels", 28 * 28 * 1280))
        resized = smart_resize(image.height, image.width, factor=self.patch * self.merge, min_pixels=low, max_pixels=high)
        return ImageGeometry((image.height, image.width), tuple(resized), (0, 0, *resized),
                             int(image.info.get("exif_orientation", 1)))

    def packed(self, pixel_values: Tensor, model_inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Pixel values as the model takes them: packed patches as given, or (B, 3, H, W) pictures of one size (what
        the baselines and the metrics perturb) packed here, with their ``image_grid_thw``."""
        if pixel_values.ndim != 4:
            return pixel_values, model_inputs
        if model_inputs.get("image_grid_thw") is not None:
            raise ValueError("pixel_values of shape (B, 3, H, W) are pictures, packed here: pass no image_grid_thw with them")
        packed, grid = pack_pictures(pixel_values, self.merge, self.patch, self.config.vision_config.temporal_patch_size)
        return packed, {**model_inputs, "image_grid_thw": grid}

    def answer_batch(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                     answer_mask: Tensor, **model_inputs: Tensor) -> AnswerBatch:
        pixel_values, model_inputs = self.packed(pixel_values, model_inputs)
        return super().answer_batch(pixel_values, input_ids, attention_mask, answer_ids, answer_mask, **model_inputs)

    def generate_answers(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         max_new_tokens: int = 16, **model_inputs: Tensor) -> tuple[Tensor, Tensor]:
        pixel_values, model_inputs = self.packed(pixel_values, model_inputs)
        return super().generate_answers(pixel_values, input_ids, attention_mask, max_new_tokens, **model_inputs)

    # ------------------------------------------------------------------ layout
    def _parts(self) -> tuple[nn.Module, nn.Module]:
        """(vision transformer, language model): 5.x keeps both in ``model.model``, 4.4x the tower on the top model."""
        inner = self.module.model
        visual = getattr(inner, "visual", None) or self.module.visual
        return visual, getattr(inner, "language_model", inner)

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        visual, language = self._parts()
        return visual.blocks if modality == "image" else language.layers

    def resolve_layer(self, modality: Modality, layer: int, name: str) -> int:
        """Any vision block (the merger reads the last one's output) or language-model layer."""
        tower = "the vision transformer" if modality == "image" else "the language model"
        return resolve_layer(layer, self.num_layers(modality), name, tower)

    @staticmethod
    def _grids(image_grid_thw: Tensor | None, batch: int) -> Tensor:
        if image_grid_thw is None:
            raise ValueError("image_grid_thw is needed for Qwen2-VL (its processor returns it beside pixel_values)")
        if image_grid_thw.shape != (batch, 3):
            raise ValueError(f"image_grid_thw must hold one (t, rows, cols) row per question: {batch} questions, "
                             f"got shape {tuple(image_grid_thw.shape)}")
        if bool((image_grid_thw[:, 0] != 1).any()):
            raise ValueError("image_grid_thw: every sample must be one image (t = 1); videos are not explained")
        return image_grid_thw

    def _patch_counts(self, image_grid_thw: Tensor) -> list[int]:
        return image_grid_thw.prod(-1).tolist()

    def image_layout(self, pixel_values: Tensor, batch: int, image_grid_thw: Tensor | None = None) -> tuple[Tensor, ImageLayout]:
        """Every patch of the sample's image, in the packed (window) order; padded to the batch's largest image."""
        grids = self._grids(image_grid_thw, batch)
        counts = self._patch_counts(grids)
        if len(pixel_values) != sum(counts):
            raise ValueError(f"pixel_values holds {len(pixel_values)} patches, image_grid_thw says {sum(counts)}")
        device = pixel_values.device
        positions = torch.zeros(batch, max(counts), dtype=torch.bool, device=device)
        cells = torch.full((batch, max(counts)), -1, dtype=torch.long, device=device)
        for b, (_, rows, cols) in enumerate(grids.tolist()):
            positions[b, :rows * cols] = True
            cells[b, :rows * cols] = window_cells(rows, cols, self.merge).to(device)
        return positions, ImageLayout(cells, grids[:, 1:].clone(), grids[:, 1:] * self.patch)

    def sequence_inputs(self, ids: Tensor, mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor | None = None) -> dict[str, Tensor]:
        """The model's inputs with the 3-D rotary positions of each sample's real tokens (``get_rope_index``)."""
        grids = self._grids(image_grid_thw, len(ids))
        token_types = (ids == self.image_token_id).int()
        inner = self.module.model
        rope_index = getattr(inner, "get_rope_index", None) or self.module.get_rope_index
        typed = "mm_token_type_ids" in inspect.signature(rope_index).parameters  # 5.x needs the modality of each token
        kwargs = {"mm_token_type_ids": token_types} if typed else {}
        position_ids, _ = rope_index(input_ids=ids, image_grid_thw=grids, attention_mask=mask, **kwargs)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grids,
                "position_ids": position_ids, **kwargs}

    def repeat_inputs(self, inputs: dict[str, Tensor], copies: int) -> dict[str, Tensor]:
        """Each sample ``copies`` times in a row: its patch rows, grid row, tokens and positions (dim 1 of the 3-D)."""
        if copies == 1:
            return dict(inputs)
        repeated = {k: v.repeat_interleave(copies, dim=0) for k, v in inputs.items() if k not in ("pixel_values", "position_ids")}
        repeated["position_ids"] = inputs["position_ids"].repeat_interleave(copies, dim=1)
        if "pixel_values" in inputs:  # the text fit reads the input embeddings instead (fit_inputs)
            rows = torch.split(inputs["pixel_values"], self._patch_counts(inputs["image_grid_thw"]))
            repeated["pixel_values"] = torch.cat([r for r in rows for _ in range(copies)])
        return repeated

    def sample_inputs(self, inputs: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        """Sample ``index``'s patch rows and grid row with its tokens."""
        counts = self._patch_counts(self._grids(inputs.get("image_grid_thw"), len(inputs["input_ids"])))
        start = sum(counts[:index])
        one = {k: v[index:index + 1] for k, v in inputs.items() if k != "pixel_values"}
        one["pixel_values"] = inputs["pixel_values"][start:start + counts[index]]
        return one

    def image_feature_block(self) -> int:
        """The last vision block: the merger reads its output."""
        return self.num_layers("image") - 1

    def image_features(self, hidden: Tensor) -> Tensor:
        """The packed patches through the 2x2 merger."""
        return self._parts()[0].merger(hidden)

    # ------------------------------------------------------------------ packed vision tokens
    def bottleneck_tokens(self, modality: Modality, batch: AnswerBatch, output: Tensor) -> Tensor:
        """The vision block's packed (patches, D) output as (B, most patches, D), zero-padded."""
        if modality == "text":
            return output
        counts = batch.positions["image"].sum(1).tolist()
        tokens = output.new_zeros(len(counts), max(counts), output.shape[-1])
        for b, part in enumerate(torch.split(output, counts)):
            tokens[b, :len(part)] = part
        return tokens

    def bottleneck_output(self, modality: Modality, batch: AnswerBatch, tokens: Tensor) -> Tensor:
        """(B, K, T, D) back to the packed rows of the batch repeated K times per sample (sample-major)."""
        if modality == "text":
            return tokens.flatten(0, 1)
        counts = batch.positions["image"].sum(1).tolist()
        return torch.cat([tokens[b, k, :count] for b, count in enumerate(counts) for k in range(tokens.shape[1])])
