"""The amortised explainer's networks, which predict each token's log capacity from the frozen backbone's tokens at the
bottlenecks' blocks: for image-text pairs, per tower a small transformer conditioned on both towers' embeddings; for
answer models, one transformer over the image tower's and the language side's tokens together (an image token's
capacity depends on the question, and the question's on the image). Saved and loaded in hub layout
(``config.json``, ``model.safetensors``) with the backbone it was trained for."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..backbones import MODALITIES, Modality
from ..backbones.loading import resolve_shipped

EXPLAINER_FORMAT = 1
#: added to a capacity (nats) before its log: capacities of a token are >= 0 and rarely under 0.1
LOG_EPSILON = 0.01
#: the settings of the exact fit an explainer imitates: another setting gives other maps
IMITATED_SETTINGS = ("vision_layer", "text_layer", "beta", "steps", "lr", "num_noise")
#: explainers shipped in the package, and the config that trains each
SHIPPED_EXPLAINERS = {
    "shapes-clip-amortised": (Path(__file__).resolve().parent.parent / "shapes" / "assets" / "shapes-clip-amortised",
                              "configs/fit_explainer.yaml"),
}


def encode(blocks: nn.TransformerEncoder, x: Tensor, real: Tensor) -> Tensor:
    """``blocks`` over ``x`` with padding ``~real``, off PyTorch's inference fast path: its masked softmax costs
    three quarters of the network's time on CPU (the regular path runs the explainer about 2x faster in bfloat16;
    the outputs agree to 1e-5). The global switch is restored, also on errors."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return blocks(x, src_key_padding_mask=~real)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def backbone_fingerprint(module: nn.Module) -> str:
    """A short hash of a backbone's weights (names, shapes and a strided sample of every tensor, rounded to
    bfloat16 so that a bfloat16 load of the same checkpoint has the same print): what an explainer checks."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).float()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.cpu().double().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ExplainerConfig:
    """What an explainer is: the backbone and exact-fit settings it imitates, and its network's shape."""

    backbone: str  # the name_or_path it was trained with (for messages)
    fingerprint: str  # backbone_fingerprint of that backbone
    m2ib: dict[str, Any]  # the exact fit's settings (IMITATED_SETTINGS)
    feature_dims: dict[str, int]  # per tower: width of the block output the bottleneck sits on
    embed_dim: int  # width of the towers' embeddings (0 for answer models: they have none)
    width: int = 128
    depth: int = 2
    heads: int = 4
    training: dict[str, Any] = field(default_factory=dict)  # where it was trained from and how well it did
    kind: str = "pairs"  # what it explains: "pairs" (dual encoders) or "answers" (models that answer questions)
    format: int = EXPLAINER_FORMAT


class TowerHead(nn.Module):
    """One tower's predictor: tokens (B, T, D) and the pair's embeddings (B, 2E) to log capacities (B, T)."""

    def __init__(self, feature_dim: int, embed_dim: int, width: int, depth: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.tokens = nn.Linear(feature_dim, width)
        self.shift = nn.Linear(2 * embed_dim, width)  # FiLM: the other tower's embedding says what a token must keep
        self.scale = nn.Linear(2 * embed_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, 1)

    def forward(self, hidden: Tensor, token_mask: Tensor, embeddings: Tensor) -> Tensor:
        x = self.tokens(self.norm(hidden))
        x = x * (1 + self.scale(embeddings)[:, None]) + self.shift(embeddings)[:, None]
        x = encode(self.blocks, x, token_mask)
        return self.out(x).squeeze(-1)


class ExplainerNetwork(nn.Module):
    """Both towers' heads; :meth:`forward` returns per tower the predicted log(capacity + LOG_EPSILON)."""

    kind = "pairs"

    def __init__(self, config: ExplainerConfig):
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} explains {self.kind}, the config is of an explainer of {config.kind}")
        self.config = config
        self.build(config)

    def build(self, config: ExplainerConfig) -> None:
        """The layers (the network of each kind has its own; saving, loading and the backbone check are shared)."""
        self.heads = nn.ModuleDict({
            m: TowerHead(config.feature_dims[m], config.embed_dim, config.width, config.depth, config.heads) for m in MODALITIES
        })

    def forward(self, hidden: dict[Modality, Tensor], token_mask: dict[Modality, Tensor], embeddings: dict[Modality, Tensor]
                ) -> dict[Modality, Tensor]:
        unit = {m: nn.functional.normalize(embeddings[m].float(), dim=-1) for m in MODALITIES}
        pair = torch.cat([unit["image"], unit["text"]], dim=-1)
        return {m: self.heads[m](hidden[m].float(), token_mask[m], pair) for m in MODALITIES}

    def save_pretrained(self, path: str | Path) -> None:
        """Weights first, then the config that makes the directory loadable; each file whole or not at all."""
        from ..results import atomic_write

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        atomic_write(path / "config.json", json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "ExplainerNetwork":
        """An explainer directory (``config.json``, ``model.safetensors``) or ``builtin:NAME``."""
        path = Path(resolve_shipped(str(name_or_path), SHIPPED_EXPLAINERS, "explainer"))
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"explainer {str(name_or_path)!r}: {path} holds no config.json and model.safetensors "
                                    "(train one with configs/fit_explainer.yaml)")
        raw = json.loads((path / "config.json").read_text())
        if raw.get("format") != EXPLAINER_FORMAT:
            raise ValueError(f"explainer {str(name_or_path)!r} is of format {raw.get('format')}, this version reads "
                             f"{EXPLAINER_FORMAT}: retrain it")
        config = ExplainerConfig(**raw)
        if config.kind not in NETWORKS:
            raise ValueError(f"explainer {str(name_or_path)!r} explains {config.kind!r}; this version knows {sorted(NETWORKS)}")
        network = NETWORKS[config.kind](config)
        network.load_state_dict(load_file(str(path / "model.safetensors")))  # safetensors: no code runs at load
        return network.eval()

    def check_backbone(self, module: nn.Module, m2ib: dict[str, Any] | None = None, kind: str = "pairs") -> None:
        """Refuse a backbone (or exact-fit settings) other than the one this explainer was trained to imitate."""
        config = self.config
        if config.kind != kind:
            raise ValueError(f"this explainer explains {config.kind} and the run explains {kind}: train one on an exact run "
                             f"of {kind} (configs/fit_explainer.yaml)")
        if backbone_fingerprint(module) != config.fingerprint:
            raise ValueError(f"this explainer was trained for the backbone {config.backbone!r} (fingerprint "
                             f"{config.fingerprint}); the model given has other weights: train an explainer for it "
                             "(configs/fit_explainer.yaml) or fit it exactly")
        if m2ib is not None:
            differ = [f"{k}={m2ib[k]!r} (explainer: {config.m2ib[k]!r})" for k in IMITATED_SETTINGS if m2ib.get(k) != config.m2ib[k]]
            if differ:
                raise ValueError(f"m2ib settings {', '.join(differ)}: this explainer imitates the exact fit at its own "
                                 "settings; set them as it has them, or train one for yours")


class AnswerExplainerNetwork(ExplainerNetwork):
    """One transformer over an answer model's image-tower tokens and language-side tokens (the text block's output:
    the prompt, and in decoder VLMs also the image tokens as the language model reads them and the answer), each
    tagged as image, bottlenecked text position or other text position; :meth:`forward` returns the predicted
    log(capacity + LOG_EPSILON) of every image and every text-block token."""

    kind = "answers"
    #: token types: the image tower's tokens, the text bottleneck's positions, the language side's other tokens
    IMAGE, BOTTLENECKED, CONTEXT = 0, 1, 2

    def build(self, config: ExplainerConfig) -> None:
        width = config.width
        self.norms = nn.ModuleDict({m: nn.LayerNorm(config.feature_dims[m]) for m in MODALITIES})
        self.tokens = nn.ModuleDict({m: nn.Linear(config.feature_dims[m], width) for m in MODALITIES})
        self.types = nn.Embedding(3, width)
        layer = nn.TransformerEncoderLayer(width, config.heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, 1)

    def forward(self, hidden: dict[Modality, Tensor], token_mask: dict[Modality, Tensor], context: Tensor
                ) -> dict[Modality, Tensor]:
        """``hidden``: per tower (B, T, D) block outputs; ``token_mask``: per tower (B, T) the bottlenecked
        positions; ``context``: (B, T_text) the text block's real positions (bottlenecked or not)."""
        image, text = (self.tokens[m](self.norms[m](hidden[m].float())) for m in MODALITIES)
        text_types = torch.where(token_mask["text"], self.BOTTLENECKED, self.CONTEXT)
        x = torch.cat([image + self.types.weight[self.IMAGE], text + self.types(text_types)], dim=1)
        real = torch.cat([token_mask["image"], context | token_mask["text"]], dim=1)
        logs = self.out(encode(self.blocks, x, real)).squeeze(-1)
        return {"image": logs[:, :image.shape[1]], "text": logs[:, image.shape[1]:]}


#: the network of each kind of explainer
NETWORKS = {ExplainerNetwork.kind: ExplainerNetwork, AnswerExplainerNetwork.kind: AnswerExplainerNetwork}
