from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from m2ib_lightning.shapes.models.shapes_clip import build_image_processor, build_shapes_clip, build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))

EOS = 99
ROOT = Path(__file__).resolve().parents[1]


def train_main(*args: str) -> int:
    """train.py's main in this process (no interpreter start-up): its exit status."""
    sys.path.insert(0, str(ROOT))
    import train

    return train.main(list(args))


def tiny_clip(seed: int = 0, *, layers: int = 4, eos_token_id: int = EOS):
    """A small random CLIP built from a config (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
            bos_token_id=98, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=24,
        initializer_factor=4.0,
    )
    return CLIPModel(config).eval()


def make_texts(lengths: list[int], width: int | None = None, seed: int = 0, eos: int = EOS):
    """Right-padded token ids (BOS ... EOS, pad 0) and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, 90, (length,), generator=gen)
        ids[row, 0], ids[row, length - 1] = 98, eos
        mask[row, :length] = 1
    return ids, mask


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar file of the given members (name -> bytes), in order, as WebDataset shards are."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_images(batch: int, size: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


@pytest.fixture(scope="session")
def clip():
    return tiny_clip()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small CLIP saved in the hub layout, as a user's local model directory."""
    from transformers import CLIPProcessor

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tokenizer()
    model = build_shapes_clip(tokenizer, width=32, layers=2, heads=2, projection_dim=16, seed=1)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=build_image_processor(64), tokenizer=tokenizer).save_pretrained(path)
    return path


def tiny_siglip(seed: int = 0, *, layers: int = 3):
    """A small random SigLIP (attention-pooling vision head, last-position text pooling)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=12, projection_size=48,
                         pad_token_id=1, bos_token_id=1, eos_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=32, patch_size=8),
    )
    return SiglipModel(config).eval()


def tiny_blip_itc(seed: int = 0, *, layers: int = 3):
    """A small random BLIP image-text retrieval model, used in its contrastive (ITC) mode."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, encoder_hidden_size=48, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=97, sep_token_id=EOS),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.2),
        image_text_hidden_size=24,
    )
    return BlipForImageTextRetrieval(config).eval()


def tiny_plain(seed: int = 0):
    from plain_dual_encoder import PlainDualEncoder

    torch.manual_seed(seed)
    return PlainDualEncoder().eval()


def world_word_tokenizer(eos: str = "</s>"):
    """A word-level tokenizer over the shapes world, saved without a length limit (model_max_length ~1e30)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from m2ib_lightning.shapes.world import vocabulary

    vocab = {w: i for i, w in enumerate(["<pad>", eos, "<unk>", *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=eos, unk_token="<unk>")


@pytest.fixture(scope="session")
def siglip_bundle(tmp_path_factory) -> Path:
    """A tiny SigLIP saved with save_pretrained, its tokenizer without a length limit."""
    from transformers import SiglipImageProcessor, SiglipProcessor

    path = tmp_path_factory.mktemp("tiny-siglip")
    tokenizer = world_word_tokenizer()
    assert tokenizer.model_max_length > 1e20  # the 'no limit' sentinel many saved checkpoints carry
    tiny_siglip(seed=2).save_pretrained(path)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def blip_itc_bundle(tmp_path_factory) -> Path:
    """A tiny BLIP image-text retrieval model saved with save_pretrained, with a WordPiece tokenizer."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_vqa_tokenizer

    path = tmp_path_factory.mktemp("tiny-blip-itc")
    tokenizer = build_vqa_tokenizer()
    torch.manual_seed(3)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.2),
        image_text_hidden_size=24,
    )
    BlipForImageTextRetrieval(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vqa_bundle(tmp_path_factory) -> Path:
    """A small random BLIP VQA model with the world's WordPiece tokenizer, saved in the hub layout."""
    from transformers import BlipProcessor

    from m2ib_lightning.shapes.models.shapes_blip_vqa import build_shapes_blip_vqa, build_vqa_image_processor, build_vqa_tokenizer

    path = tmp_path_factory.mktemp("tiny-blip-vqa")
    tokenizer = build_vqa_tokenizer()
    model = build_shapes_blip_vqa(tokenizer, image_size=32, width=32, vision_layers=2, text_layers=2, heads=4, seed=5)
    with torch.no_grad():  # larger weights than the default init: a random model whose answers the image moves
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.3)
    model.save_pretrained(path)
    BlipProcessor(image_processor=build_vqa_image_processor(32), tokenizer=tokenizer).save_pretrained(path)
    return path


#: The colour of an image that ``nan_for_grey_seven`` turns into non-finite pixels.
GREY_SEVEN = (7, 7, 7)


@pytest.fixture
def nan_for_grey_seven(monkeypatch):
    """The HF CLIP adapter makes NaN pixels of any image whose first pixel is GREY_SEVEN: a sample the model refuses."""
    from m2ib_lightning.backbones import HFCLIPBackbone

    original = HFCLIPBackbone.image_inputs

    def corrupt(self, image):
        pixels = original(self, image)
        return torch.full_like(pixels, float("nan")) if image.getpixel((0, 0)) == GREY_SEVEN else pixels

    monkeypatch.setattr(HFCLIPBackbone, "image_inputs", corrupt)


def answer_localisation(name: str, kinds: tuple[str, ...], questions: int, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """M2IB explaining the right answer to held-out questions (world seed 2) of a shipped VQA model: the pointing
    game of each image map against the questioned object's mask, and how often a random map's peak lands there."""
    from m2ib_lightning import attribute
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.shapes.questions import ShapesVQA
    from m2ib_lightning.shapes.world import ShapesWorld
    from m2ib_lightning.metrics import pointing_game

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_answers import question_batch

    model = load_backbone(name)
    vqa = ShapesVQA(ShapesWorld(seed=2, image_size=64, max_objects=3, noise=0.03), kinds)
    items = [vqa.sample(i) for i in range(questions)]
    pixels, prompts, answers = question_batch(model, items)
    masks = torch.stack([torch.as_tensor(item.sample.object_masks[item.question.target]) for item in items])
    result = attribute(model.module, pixels, prompts["input_ids"], prompts["attention_mask"], answer_ids=answers["input_ids"],
                       answer_mask=answers["attention_mask"], seed=0, **settings)
    return pointing_game(result.image_maps, masks), masks.flatten(1).float().mean(1)


def assert_runs_agree(one: Path, two: Path, count: int, fields: tuple[str, ...]) -> dict[str, dict]:
    """Two amortised, audited runs of the same ``count`` samples (e.g. on 1 and 2 processes): the same audited ids
    (chosen by a hash of the id), equal audits and equal record ``fields`` (to 1e-5); returns ``one``'s index by id."""
    from m2ib_lightning.results import index_entries, read_attributions

    entries = {name: {e["id"]: e for e in index_entries(path)} for name, path in (("one", one), ("two", two))}
    audited = {name: {i for i, e in es.items() if "audit" in e} for name, es in entries.items()}
    assert audited["one"] == audited["two"] and 0 < len(audited["one"]) < count, "the audited ids depend on the id alone"
    for sample_id in audited["one"]:
        for key, value in entries["one"][sample_id]["audit"].items():
            assert entries["two"][sample_id]["audit"][key] == pytest.approx(value, abs=1e-5), key
    maps = {name: {r.id: r for r in read_attributions(path)} for name, path in (("one", one), ("two", two))}
    assert set(maps["one"]) == set(maps["two"]) and len(maps["one"]) == count
    for sample_id, record in maps["one"].items():
        for field in fields:
            torch.testing.assert_close(getattr(maps["two"][sample_id], field), getattr(record, field), atol=1e-5, rtol=0)
    return entries["one"]
