"""Maps made elsewhere (another tool, another library), scored beside M2IB's on the same table.

A method named by the user reads, for each sample id, an image map from a directory (``ID.npy`` or ``ID.png``, any
size) or from a safetensors file (``ID/image``, and ``ID/text`` aligned with the sample's real tokens where the file
has text maps). Image maps are resized bilinearly to the model input's size and min-maxed, as every method's are.
An id without a map is reported (``Maps.missing``) and left out of that method's metrics, never dropped silently.
File names come from ids: a name that would leave the maps directory is refused as missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import minmax
from .base import AttributionMethod, Maps


class ExternalMaps(AttributionMethod):
    """The maps under ``maps`` (a directory of ``.npy`` / ``.png`` files, or a ``.safetensors`` file), by sample id."""

    name = "external"

    def __init__(self, backbone: Any, *, maps: str, name: str = "external"):
        super().__init__(backbone)
        self.name, self.root = name, Path(maps)
        if not self.root.exists():
            raise ValueError(f"maps={maps!r} does not exist: a directory of ID.npy / ID.png files or a .safetensors file")
        self.keys: set[str] | None = None
        if self.root.is_file():
            from safetensors import safe_open

            if self.root.suffix != ".safetensors":
                raise ValueError(f"maps={maps!r}: a file of maps must be .safetensors (keys ID/image, ID/text)")
            with safe_open(str(self.root), "pt") as handle:
                self.keys = set(handle.keys())
        self.has_text_map = self.keys is not None and any(k.endswith("/text") for k in self.keys)

    def _file_map(self, sample_id: str) -> Tensor | str:
        """The image map of ``sample_id`` from the directory, or why there is none."""
        root = self.root.resolve()
        for suffix in (".npy", ".png"):
            path = (self.root / f"{sample_id}{suffix}").resolve()
            if not path.is_relative_to(root):
                return f"id {sample_id!r} names a file outside {str(self.root)!r}"
            if path.is_file():
                if suffix == ".npy":
                    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
                from PIL import Image

                with Image.open(path) as image:
                    return torch.from_numpy(np.asarray(image.convert("F"), dtype=np.float32).copy())
        return f"no {sample_id}.npy or {sample_id}.png in {str(self.root)!r}"

    def _stored(self, sample_id: str, kind: str) -> Tensor | None:
        key = f"{sample_id}/{kind}"
        if key not in self.keys:
            return None
        from safetensors import safe_open

        with safe_open(str(self.root), "pt") as handle:
            return handle.get_tensor(key).float()

    def attribute(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, seeds: Tensor,
                  special: Tensor | None = None, answers: tuple[Tensor, Tensor] | None = None,
                  ids: list[str] | None = None) -> Maps:
        if ids is None or len(ids) != len(pixel_values):
            raise ValueError(f"method {self.name!r} reads maps by sample id: pass ids, one per sample")
        size, device = tuple(pixel_values.shape[-2:]), pixel_values.device
        image = torch.full((len(ids), *size), float("nan"), device=device)
        text = torch.full(input_ids.shape, float("nan"), device=device) if self.has_text_map else None
        missing: dict[int, str] = {}
        for row, sample_id in enumerate(ids):
            found = self._file_map(sample_id) if self.keys is None else self._stored(sample_id, "image")
            if found is None:
                found = f"no {sample_id}/image in {str(self.root)!r}"
            if isinstance(found, str):
                missing[row] = found
                continue
            if found.dim() != 2 or not bool(torch.isfinite(found).all()):
                missing[row] = f"the map of {sample_id!r} is not a finite 2-D array (shape {tuple(found.shape)})"
                continue
            resized = F.interpolate(found[None, None].to(device), size=size, mode="bilinear", align_corners=False)[0, 0]
            image[row] = minmax(resized[None])[0]
            if text is not None:
                length = int(attention_mask[row].sum())
                tokens = self._stored(sample_id, "text")
                if tokens is None or tokens.shape != (length,):
                    missing[row] = (f"no {sample_id}/text of {length} values (the sample's real tokens) in "
                                    f"{str(self.root)!r}")
                    continue
                real = attention_mask[row].bool()
                text[row] = 0
                text[row, real] = minmax(tokens[None].to(device))[0]
        return Maps(image, text, missing)
