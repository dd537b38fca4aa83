"""The small protocol every vision-language backbone adapter meets.

The M2IB engine never touches a model directly: it asks an adapter to run one
tower up to the output of block ``layer`` (the *prefix*, run once per sample)
and to run the rest of the tower from there to the projected embedding (the
*tail*, run at every fitting step). Runs also ask the adapter to turn an image
and a caption into model inputs, and to name tokens for display. Anything
model specific (loading, preprocessing, token layout, pooling, masks) stays
behind this protocol.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")


@dataclass(frozen=True)
class TowerState:
    """A tower's residual stream after block ``layer``, plus what its tail needs.

    ``hidden`` is (B, T, D); ``token_mask`` (B, T) marks real tokens;
    ``pool_index`` (B,) is the position the tower pools into its embedding (or
    None when it pools over every token, like an attention-pooling head);
    ``attention_bias`` is an optional additive (B, 1, T, T) or (B, 1, 1, T) mask for the tail.
    """

    hidden: Tensor
    token_mask: Tensor
    pool_index: Tensor | None
    layer: int
    attention_bias: Tensor | None = None

    def repeat_interleave(self, copies: int) -> "TowerState":
        """Repeat every row ``copies`` times, in place of K noise copies per sample."""
        rep = lambda t: None if t is None else t.repeat_interleave(copies, dim=0)  # noqa: E731
        return replace(
            self,
            hidden=rep(self.hidden),
            token_mask=rep(self.token_mask),
            pool_index=rep(self.pool_index),
            attention_bias=rep(self.attention_bias),
        )


@dataclass(frozen=True)
class TextEncoding:
    """Token ids of one caption, cut to the model's limit; ``full_length`` is the count before the cut."""

    ids: list[int]
    full_length: int

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.ids)


@dataclass(frozen=True)
class ImageLayout:
    """Where each image-bottleneck position lies on its sample's picture: ``cells`` (B, T) its index in the
    row-major (rows, cols) patch grid, -1 for a token that is no patch (CLS, padding); ``grids`` (B, 2) each
    sample's (rows, cols); ``sizes`` (B, 2) the (height, width) in pixels of the image as the model saw it."""

    cells: Tensor
    grids: Tensor
    sizes: Tensor

    @classmethod
    def uniform(cls, batch: int, prefix: int, grid: tuple[int, int], size: tuple[int, int], device: Any = None) -> "ImageLayout":
        """Every sample the same grid, its tokens ``prefix`` non-patch tokens (CLS) then the patches in raster order."""
        rows, cols = grid
        cells = torch.cat([torch.full((prefix,), -1), torch.arange(rows * cols)]).to(device).expand(batch, -1)
        return cls(cells, torch.tensor([grid] * batch, device=device), torch.tensor([size] * batch, device=device))


@dataclass(frozen=True)
class AnswerBatch:
    """Model inputs for (prompt, answer) pairs and where the fit reads and writes.

    ``positions[modality]`` (B, T) marks the bottlenecked positions of that tower's block outputs, as
    ``bottleneck_tokens`` lays them out; ``image`` places the image positions on the picture;
    ``prompt_columns[b]`` are the positions, in the text block's output, of sample b's real prompt tokens, in
    ``input_ids`` order, and ``input_columns[b]`` their columns in ``input_ids``; ``targets`` / ``score_mask``
    (B, A) are the answer tokens to score; where the adapter needs them, ``score_positions`` are the sequence
    positions whose logits are computed and ``score_index`` (B, A) says which of them predicts each answer token
    (both fixed for a batch, so they are found once, not at every fit step). ``inputs`` holds what the adapter's forward takes.
    """

    inputs: dict[str, Tensor]
    positions: dict[str, Tensor]
    image: ImageLayout
    input_columns: list[Tensor]
    prompt_columns: list[Tensor]
    targets: Tensor
    score_mask: Tensor
    score_positions: Tensor | None = None
    score_index: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.targets.shape[0]


@dataclass(frozen=True)
class AttentionReadout:
    """Where rollout and Chefer read one sample's relevance, in the token groups of the adapter's
    ``attention_graph``: the rows ``score_rows`` of group ``score_group`` predict the answer's tokens (their
    relevance rows are summed); the image's cells are the positions ``image_cells`` of group ``image_group``, in
    raster order of ``grid``; the prompt's tokens are group ``text_group``'s positions, numbered as the text
    bottleneck numbers them (``AnswerBatch.prompt_columns``)."""

    score_group: str
    score_rows: Tensor
    image_group: str
    image_cells: Tensor
    grid: tuple[int, int]
    text_group: str


def square_patch_grid(config: Any, pixel_values: Tensor) -> tuple[int, int]:
    """(rows, cols) of a ViT's patches on (B, C, H, W) pixel values: the vision config's patch size."""
    patch = config.vision_config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


def one_image_per_sample(pixel_values: Tensor, batch: int) -> None:
    """ValueError unless ``pixel_values`` holds one image per question."""
    if len(pixel_values) != batch:
        raise ValueError(f"pixel_values must hold one image per question: {batch} questions, {len(pixel_values)} images")


def real_tokens(ids: Tensor, mask: Tensor, name: str) -> list[Tensor]:
    """Each row's real tokens (where ``mask`` is 1, in order: left or right padding removed); ValueError naming
    ``name`` for a row without any."""
    rows = [row[keep.bool()] for row, keep in zip(ids, mask)]
    for b, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"{name}: sample {b} has no real token (its mask is all 0)")
    return rows


@runtime_checkable
class VisionLanguageBackbone(Protocol):
    """What the engine needs from a dual-encoder model."""

    #: The wrapped ``nn.Module`` (switched to eval mode during a fit, never modified).
    module: nn.Module
    #: Tokens before the patch grid in the image tower (1 for CLS, 0 for SigLIP).
    num_prefix_tokens: int

    def blocks(self, modality: Modality) -> Sequence[nn.Module]:
        """The tower's encoder blocks; block ``l``'s output is the residual stream M2IB edits at layer ``l``."""

    def num_layers(self, modality: Modality) -> int:
        """Number of encoder blocks of the tower."""

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """(rows, cols) of the patch grid for images of this size."""

    def embed(self, modality: Modality, inputs: dict[str, Tensor]) -> Tensor:
        """Clean projected embedding (B, P) of a whole batch, through the model's own forward."""

    def prefix(self, modality: Modality, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Run the tower up to and including block ``layer``."""

    def tail(self, modality: Modality, hidden: Tensor, state: TowerState) -> Tensor:
        """Run blocks ``state.layer + 1 ..``, final norm, pooling and projection on ``hidden``."""

    def validate_inputs(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Raise ValueError naming the argument if the inputs do not fit this model."""


@dataclass(frozen=True)
class ImageGeometry:
    """How the processor turned an image into pixel values: original size, resize, then crop (all (height, width)).

    Exports keep it, so that maps at the model's input size go back onto the user's own photo.
    """

    original: tuple[int, int]  # of the upright picture (its EXIF orientation applied, as viewers show it)
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]  # top, left, height, width within the resized image
    exif_orientation: int = 1  # the EXIF orientation tag the file carried (1: stored upright)

    def to_original(self, image_map: Tensor) -> Tensor:
        """(h, w) map at the crop's size -> (H, W) at the original size; what the crop cut off is 0."""
        top, left, height, width = self.crop
        canvas = image_map.new_zeros(self.resized)
        rows = slice(max(top, 0), min(top + height, self.resized[0]))
        cols = slice(max(left, 0), min(left + width, self.resized[1]))
        canvas[rows, cols] = image_map[rows.start - top: rows.stop - top, cols.start - left: cols.stop - left]
        return torch.nn.functional.interpolate(canvas[None, None], size=self.original, mode="bilinear", align_corners=False)[0, 0]

    def to_model(self, mask: Tensor) -> Tensor:
        """(H, W) ground-truth mask of the original image -> the model input's (crop) coordinates, nearest neighbour."""
        if tuple(mask.shape) != self.original:
            raise ValueError(f"mask is {tuple(mask.shape)} but the image is {self.original}")
        resized = torch.nn.functional.interpolate(mask[None, None].float(), size=self.resized, mode="nearest")[0, 0]
        top, left, height, width = self.crop
        out = resized.new_zeros(height, width)
        rows = slice(max(top, 0), min(top + height, self.resized[0]))
        cols = slice(max(left, 0), min(left + width, self.resized[1]))
        out[rows.start - top: rows.stop - top, cols.start - left: cols.stop - left] = resized[rows, cols]
        return out.bool()


class HFPreprocessing:
    """Preprocessing through a Hugging Face processor (``image_processor`` + ``tokenizer``), for runs.

    Subclasses set ``processor`` (or None: the adapter then serves the engine
    only) and ``max_text_positions``; ``pad_to_max_length`` is for models used
    with fixed-length text and no attention mask (SigLIP).
    """

    processor: Any = None
    max_text_positions: int = 0
    pad_to_max_length: bool = False

    def _require_processor(self) -> Any:
        if self.processor is None:
            raise RuntimeError(
                f"{type(self).__name__} was built without a processor; load it with from_pretrained(name_or_path) "
                "to preprocess images and captions"
            )
        return self.processor

    @property
    def tokenizer(self) -> Any:
        return self._require_processor().tokenizer

    @property
    def text_limit(self) -> int:
        """Longest token sequence the model takes: the tokenizer's limit, unless it is a 'no limit' sentinel."""
        limit = self.tokenizer.model_max_length
        return self.max_text_positions if limit is None or limit > self.max_text_positions else int(limit)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def unknown_token_id(self) -> int | None:
        """The tokenizer's unknown-word id (None if it has none): a caption of nothing else is reported."""
        return self.tokenizer.unk_token_id

    @property
    def structural_token_ids(self) -> set[int]:
        """BOS, EOS, CLS and SEP: ids a tower reads by their place (pooling, ends of text), never a word's stand-in."""
        t = self.tokenizer
        return {int(i) for i in (t.bos_token_id, t.eos_token_id, t.cls_token_id, t.sep_token_id) if i is not None}

    @property
    def neutral_token_id(self) -> int:
        """The id that stands in for a removed word in text perturbations: padding, else unknown, else mask, else
        the tokenizer's ``.``, else its first ordinary token; never a structural id. OpenAI CLIP's tokenizers pad
        (and mark unknown words) with ``<|endoftext|>``, where the text tower pools: a word replaced by it would
        move the pooled position, so there it is ``.``."""
        t, structural = self.tokenizer, self.structural_token_ids
        for candidate in (t.pad_token_id, t.unk_token_id, getattr(t, "mask_token_id", None)):
            if candidate is not None and int(candidate) not in structural:
                return int(candidate)
        dot = t(".", add_special_tokens=False)["input_ids"]
        special = structural | set(t.all_special_ids)
        if len(dot) == 1 and dot[0] not in special:
            return int(dot[0])
        return next(i for i in range(len(t)) if i not in special)

    def image_inputs(self, image: Any) -> Tensor:
        """One RGB image as the model's (C, H, W) pixel values."""
        processor = self._require_processor()
        return processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def image_geometry(self, image: Any) -> ImageGeometry:
        """The resize and centre crop ``image_inputs`` applies to this image, from the image processor's settings."""
        config = self._require_processor().image_processor
        height, width = image.height, image.width
        resized = (height, width)
        size = getattr(config, "size", None) or {}
        if getattr(config, "do_resize", False) and size:
            if size.get("shortest_edge"):
                short, long = sorted((height, width))
                edge = int(size["shortest_edge"])
                scaled = (edge, int(edge * long / short))
                resized = scaled if height <= width else scaled[::-1]
            elif size.get("height") and size.get("width"):
                resized = (int(size["height"]), int(size["width"]))
        crop = (0, 0, *resized)
        crop_size = getattr(config, "crop_size", None) or {}
        if getattr(config, "do_center_crop", False) and crop_size:
            crop_h, crop_w = int(crop_size["height"]), int(crop_size["width"])
            crop = ((resized[0] - crop_h) // 2, (resized[1] - crop_w) // 2, crop_h, crop_w)
        return ImageGeometry((height, width), resized, crop, int(image.info.get("exif_orientation", 1)))

    def text_inputs(self, text: str) -> TextEncoding:
        """One caption as token ids, cut to :attr:`text_limit` (and padded to it for fixed-length models)."""
        tokenizer, limit = self.tokenizer, self.text_limit
        full = len(tokenizer(text)["input_ids"])
        padding = "max_length" if self.pad_to_max_length else False
        ids = tokenizer(text, truncation=True, max_length=limit, padding=padding)["input_ids"]
        return TextEncoding(list(ids), full)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's pieces, markers included (``cat</w>``, ``##s``): what exports keep."""
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def special_mask(self, ids: Sequence[int]) -> list[bool]:
        """True for special tokens (BOS, EOS, CLS, SEP, padding), which displays leave out."""
        special = set(self.tokenizer.all_special_ids)
        return [int(i) in special for i in ids]

    def display_image(self, pixel_values: Tensor) -> np.ndarray:
        """Undo the processor's normalisation: (3, H, W) float -> (H, W, 3) uint8."""
        image_processor = self._require_processor().image_processor
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
        image = pixel_values.detach().cpu().float() * std + mean
        return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class HFLayout:
    """Layout every Hugging Face adapter shares: tower depth from ``blocks``, patch grid from the vision config."""

    config: Any

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Towers and attention always; preprocessing when loaded with a processor (``from_pretrained``)."""
        return ("towers", "attention", *(("preprocessing",) if getattr(self, "processor", None) is not None else ()))

    def num_layers(self, modality: Modality) -> int:
        return len(self.blocks(modality))

    def patch_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        patch = self.config.vision_config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def attention_modules(self, modality: Modality) -> list[nn.Module]:
        """Each block's self-attention, whose output is (context, probabilities (B, heads, T, T)) in eager attention."""
        return [getattr(block, "self_attn", None) or block.attention.self for block in self.blocks(modality)]

    def eager_attention(self) -> ContextManager[None]:
        """Run attention in eager mode (attention probabilities returned); the model's setting comes back after."""
        return eager_attention(self.module)


@contextlib.contextmanager
def eager_attention(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s attention in eager mode (attention probabilities returned) and restore its setting, also on errors.

    Through the model's public ``set_attn_implementation`` where transformers has it (5.x), else (4.x) the
    configs' attention field; either way each sub-config gets its own setting back.
    """
    config = module.config
    configs = {name: c for name, c in (("", config), ("vision_config", getattr(config, "vision_config", None)),
                                        ("text_config", getattr(config, "text_config", None))) if c is not None}
    saved = {name: c._attn_implementation for name, c in configs.items()}
    setter = getattr(module, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            for c in configs.values():
                c._attn_implementation = "eager"
        yield
    finally:
        if setter is not None:
            setter(saved[""] if len(set(saved.values())) == 1 else {k: v for k, v in saved.items() if v is not None})
        for name, c in configs.items():  # sub-configs the setter does not reach
            c._attn_implementation = saved[name]


def attention_probabilities(modules: Sequence[nn.Module], run: Callable[[], Any]) -> list[Tensor]:
    """The attention probabilities each of ``modules`` returns second (eager attention) while ``run()`` runs, in
    call order; the hooks are removed, also on errors."""
    probs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: probs.append(out[1])) for m in modules]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return probs


class HFAnswerLayout:
    """What the Hugging Face adapters of VLMs that answer share: depth from ``blocks``, the patch grid from the vision
    config, and loading through ``transformers.<model_class>.from_pretrained`` with the processor."""

    capabilities = ("answers",)
    model_class = ""  # the transformers class name
    config: Any

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, hub: Any = None) -> Any:
        import transformers

        from .loading import load_pretrained

        return cls(*load_pretrained(getattr(transformers, cls.model_class), name_or_path, hub))

    def num_layers(self, modality: Modality) -> int:
        return len(self.blocks(modality))

    def fit_inputs(self, modality: Modality, batch: AnswerBatch) -> AnswerBatch:
        """The batch for the passes of one fit, with what that fit cannot change computed once (nothing here)."""
        return batch

    def bottleneck_tokens(self, modality: Modality, batch: AnswerBatch, output: Tensor) -> Tensor:
        """A block's output as (B, T, D) token rows: already so for towers that keep a batch dimension."""
        return output

    def bottleneck_output(self, modality: Modality, batch: AnswerBatch, tokens: Tensor) -> Tensor:
        """(B, K, T, D) bottlenecked tokens as the block's output for the batch repeated K times per sample."""
        return tokens.flatten(0, 1)

    def sample_inputs(self, inputs: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        """Sample ``index``'s inputs alone (``pixel_values``, ``input_ids``, ..., as the front door takes them)."""
        return {name: value[index:index + 1] for name, value in inputs.items()}


def clean_token(token: str) -> str:
    """A tokenizer piece without its word markers: ``cat</w>`` -> ``cat``, ``##s`` -> ``s``, ``▁cat`` -> ``cat``."""
    return token.removesuffix("</w>").removeprefix("##").removeprefix("▁").removeprefix("Ġ")


def tower_inputs(modality: Modality, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """The keyword inputs of one tower."""
    if modality == "image":
        return {"pixel_values": pixel_values}
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def other(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


def resolve_layer(layer: int, count: int, name: str, tower: str = "the tower") -> int:
    """A block index, negative ones counted from the end (-1 is the last block); ValueError naming ``name`` if out of range."""
    if not -count <= layer < count:
        raise ValueError(
            f"{name}={layer} is out of range: {tower} has {count} blocks, so use 0..{count - 1} (or -{count}..-1 from the end)"
        )
    return layer % count


def block_output(output: Any) -> Tensor:
    """A block's hidden states: 5.x blocks return a tensor, 4.x blocks a tuple."""
    return output[0] if isinstance(output, tuple) else output


def features(output: Any) -> Tensor:
    """``get_*_features`` returns a tensor in 4.x and an output object in 5.x."""
    return output if isinstance(output, Tensor) else output.pooler_output


def token_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax(logits)[tokens] in at least float32: bf16 logits under autocast would round an answer's
    log-probability (the fit term of answer models) to 8 bits."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


def padding_bias(token_mask: Tensor, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """One additive (B, 1, T, T) mask: real keys only (and causal, if asked)."""
    t = token_mask.shape[1]
    allowed = token_mask[:, None, None, :].expand(-1, 1, t, t)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=token_mask.device).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=token_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)

def pad_token_ids(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into (B, L) ids and their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask
