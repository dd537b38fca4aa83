"""Every `python train.py ...` command of README.md and docs/ is run as written, with small data in place of the
paths that do not exist here (manifests, WebDataset shards, checkpoints, output folders) and a few small sizes.

Fit commands (which train for tens of minutes) have their config loaded and checked; every other command runs
through train.py to the end. A command a reader would copy and that exits 2 fails here.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, tiny_plain, write_tar
from m2ib_lightning.config import load_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[tuple[str, list[str]]]:
    """(where, train.py arguments) of every command: fenced shell blocks (continuation lines joined) and inline code."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0]
                if "train.py" in line:
                    found.append((f"{path.name}: {line.strip()[:60]}", shlex.split(line.split("train.py", 1)[1])))
        for inline in re.findall(r"`((?:\.venv/bin/)?python train\.py[^`]*)`", text):
            args = shlex.split(inline.split("train.py", 1)[1])
            if any(a.startswith(("[", "-")) or "..." in a for a in args):
                continue  # the usage line and --help
            found.append((f"{path.name}: {inline[:60]}", args))
    return found


COMMANDS = list({tuple(args): (where, args) for where, args in reversed(_commands())}.values())[::-1]  # each once


def test_the_docs_hold_the_commands_this_test_runs():
    assert len(COMMANDS) >= 10
    assert any("data.webdataset" in " ".join(args) for _, args in COMMANDS)  # the cluster commands are among them


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file
    from transformers import CLIPProcessor

    from m2ib_lightning.shapes.models.shapes_clip import build_image_processor, build_shapes_clip, build_tokenizer

    root = tmp_path_factory.mktemp("docs-data")
    clip = root / "clip-12-blocks"  # as deep as the hub CLIPs the docs name, so their layer numbers exist
    tokenizer = build_tokenizer()
    build_shapes_clip(tokenizer, width=16, layers=12, heads=2, projection_dim=8, seed=3).save_pretrained(clip)
    CLIPProcessor(image_processor=build_image_processor(64), tokenizer=tokenizer).save_pretrained(clip)
    rows = []
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png_bytes(i))
        rows.append(json.dumps({"id": f"p{i}", "image": f"{i}.png", "text": "a red circle", "boxes": [[0, 0, 20, 20]]}))
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    (root / "shards").mkdir()
    for shard in range(2):
        write_tar(root / "shards" / f"{shard:05d}.tar", {f"k{shard}.png": _png_bytes(10 + shard), f"k{shard}.txt": b"a blue square"})
    plain = root / "plain-model"
    plain.mkdir()
    save_file(tiny_plain(seed=1).state_dict(), str(plain / "weights.safetensors"))
    questions = [{"id": f"q{i}", "image": f"{i}.png", "question": "what colour is the circle?", "boxes": [[0, 0, 20, 20]],
                  **({"answer": "red"} if i else {})} for i in range(3)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"root": root, "manifest": root / "pairs.jsonl", "webdataset": root / "shards" / "{00000..00001}.tar",
            "clip": clip, "plain": plain, "questions": root / "questions.jsonl", "llava": _llava_12_layers(root / "llava"),
            "answer_explainer": _answer_explainer(root / "answer-explainer")}


def _answer_explainer(path: Path) -> Path:
    """An (untrained) explainer of the shipped BLIP VQA's answers at the settings of its VQA configs: what the docs'
    `m2ib.explainer=runs/.../explainer` names after `fit_explainer` ran."""
    from m2ib_lightning.amortised import new_answer_explainer
    from m2ib_lightning.backbones import load_backbone
    from m2ib_lightning.engine import M2IBConfig
    from m2ib_lightning.shapes.world import ShapesWorld

    model = load_backbone("builtin:shapes-blip-vqa")
    question = model.question_inputs(ShapesWorld(seed=0).sample(0).image, "what colour is the circle?")
    ids, images = torch.tensor([question.ids]), model.join_inputs([question.image])
    answer = torch.tensor([model.answer_inputs("red")])
    batch = model.answer_batch(images.pop("pixel_values"), ids, torch.ones_like(ids), answer, torch.ones_like(answer), **images)
    settings = M2IBConfig(vision_layer=0, text_layer=1, beta=0.1, steps=10, lr=1.0, num_noise=10)
    new_answer_explainer(model, settings, batch, width=16, depth=1, heads=2).save_pretrained(path)
    return path


def _llava_12_layers(path: Path) -> Path:
    """A tiny LLaVA whose language model is as deep as the hub ones the docs name (12 layers), saved with its processor."""
    from m2ib_lightning.shapes.models.shapes_llava import build_llava_processor, build_llava_tokenizer, build_shapes_llava

    tokenizer = build_llava_tokenizer()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    build_shapes_llava(tokenizer, vision, width=16, layers=12, heads=2, vision_feature_layer=-1).save_pretrained(path)
    build_llava_processor(tokenizer, 32, 8).save_pretrained(path)
    return path


SMALL = {  # sizes appended to a command so that it ends in seconds; the command's own keys come first
    "attribute": ["data.num_samples=2", "m2ib.steps=2", "m2ib.num_noise=2", "export.overlays=1"],
    "evaluate": ["data.num_samples=2", "m2ib.steps=2", "m2ib.num_noise=2", "methods=[m2ib,saliency,random]", "metrics.steps=2"],
    "attribute_vqa": ["data.num_samples=2", "m2ib.steps=2", "m2ib.num_noise=2", "export.overlays=1", "answers.max_new_tokens=2"],
    "evaluate_vqa": ["data.num_samples=2", "m2ib.steps=2", "m2ib.num_noise=2", "methods=[m2ib,saliency,rollout,chefer,random]",
                     "metrics.steps=2", "answers.max_new_tokens=2"],
    "sweep": ["data.num_samples=2", "m2ib.steps=2", "m2ib.num_noise=2", "metrics.steps=2", "sweep.vision_layer=[0]",
              "sweep.text_layer=[1]", "sweep.beta=[0.1]"],
    "probe": ["data.num_pairs=2"],
    "probe_vqa": ["data.num_pairs=2", "probe.sites=[resid]"],  # a site of BLIP VQA's and of the decoders' towers
}


def _small_data(args: list[str], data: dict[str, Path], out: Path) -> tuple[list[str], bool]:
    """The command's arguments with its paths pointed at small data here; whether the model is the plain example."""
    config = args[0] if args and args[0].endswith(".yaml") else None
    questions = config is not None and "_vqa" in config and "probe" not in config  # a VQA run: questions, a VQA model
    decoder = config is not None and "probe_shapes_llava" in config  # probing a LLaVA or a Qwen2-VL checkpoint
    replaced, plain = [], False
    for arg in args[1:] if config else args:
        key, _, value = arg.partition("=")
        if key == "output_dir" or key == "save_to":
            value = str(out / key)
        elif key == "data.manifest" and value != "null":
            value = str(data["questions"] if questions else data["manifest"])
        elif key == "model.name_or_path" and (questions or decoder) and not value.startswith("builtin:"):
            value = str(data["llava"])
        elif key == "data.webdataset":
            value = str(data["webdataset"])
        elif key == "model.name_or_path" and not value.startswith("builtin:"):
            value = str(data["plain"] if "plain" in value else data["clip"])
        elif key == "model.adapter" and "plain_dual_encoder" in value:
            plain = True
        elif key in ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy"):
            continue  # the cluster's devices: this machine runs one CPU process
        elif key == "data.num_workers":
            value = "0"
        elif key in ("m2ib.explainer", "baselines.m2ib_amortised.explainer") and value.startswith("runs/"):
            value = str(data["answer_explainer"])  # what fit_explainer saved there (the docs' explainers of answers)
        replaced.append(f"{key}={value}")
    model = OmegaConf.select(OmegaConf.load(ROOT / config if config else ROOT / "configs" / "default.yaml"),
                             "model.name_or_path")
    if model is not None and not model.startswith("builtin:") and not any(a.startswith("model.name_or_path=") for a in replaced):
        replaced.append(f"model.name_or_path={data['clip']}")  # a config whose hub model is not here
    if not any(a.startswith("output_dir=") for a in replaced):
        replaced.append(f"output_dir={out / 'output_dir'}")
    if plain:
        replaced += ["m2ib.vision_layer=1", "m2ib.text_layer=1"]
    return ([config] if config else []) + replaced, plain


@pytest.mark.parametrize("where,args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_command_of_the_docs_runs_as_written(where, args, small_data, tmp_path):
    command, _ = _small_data(args, small_data, tmp_path)  # the plain example's module: tests/ is on sys.path
    config, overrides = (command[0], command[1:]) if command and command[0].endswith(".yaml") else (None, command)
    cfg = load_config(ROOT / config if config else None, overrides)  # raises on any key the docs got wrong
    if cfg.task.startswith("fit_"):
        return  # training runs tens of minutes: its config is what the docs can get wrong
    sys.path.insert(0, str(ROOT))  # train.py's main in this process: no interpreter start-up per command
    import train

    small = SMALL.get(cfg.task, [])
    if cfg.get("m2ib", {}).get("explainer", "exact") != "exact":  # an explainer imitates the exact fit at its own settings
        small = [a for a in small if not a.startswith(("m2ib.steps=", "m2ib.num_noise="))]
    code = train.main([*([str(ROOT / config)] if config else []), *overrides, *small, "trainer.enable_progress_bar=false"])
    assert code == 0, where
    run_file = Path(cfg.output_dir) / ("sweep.json" if cfg.task == "sweep" else "run.json")  # a sweep's cells are runs
    assert Path(cfg.output_dir).is_dir() and run_file.exists()
