"""NOTICE on a VLM that answers (BLIP VQA, LLaVA, Qwen2-VL): activation patching over minimal pairs, through
Lightning ``predict``, on the probe sites the family adapter declares.

Pairs shard across devices (each pair is probed whole by one rank); each pair's
record is saved (``parts/``) as soon as it is probed, so a killed run resumes with
the pairs it had not done, and rank 0 merges every pair's record in pair order,
so 1 and N processes, and a resumed run, give the same arrays. The run holds the
output directory's lock and identity like every run. Outputs: ``effects.safetensors`` (per corruption, tower
and site: the raw per-pair effects and their mean by template role or by head),
``heads.csv`` (every head ranked per site and tower), ``summary.json``
(accuracy, important and universal heads, flagged pairs), labelled heat maps,
cross-attention overlays of the top heads, and the figures in TensorBoard.
"""

from __future__ import annotations

from dataclasses import replace
import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ..backbones.capabilities import require
from ..config import ConfigError
from ..shapes.questions import ShapesVQA, TWO_CHOICE_KINDS
from ..probing import (answer_position, head_scores, VQAPair, effect_by_role, important_heads, mean_effect, read_vqa_pairs, symmetric_token_replacement, universal_heads, vqa_minimal_pair)
from ..probing.patching import PatchingResult
from ..results import atomic_write, safe_name
from ..backbones.base import clean_token
from ..viz.figures import labelled_heatmap, tile_figures
from ..modules import VQAProbing
from .common import backbone_of, loading, output_owner, owned_trainer, world_of
from dataclasses import dataclass, field
from .schema import ModelConfig, WorldConfig

RESULT_KEYS = ("seed", "model", "world", "data", "probe")
OPTION_WORDS = {"colour": ["red", "green", "blue", "yellow", "purple", "orange", "cyan"],
                "shape": ["circle", "square", "triangle", "diamond", "cross"], "size": ["small", "large"],
                "side": ["left", "right", "above", "below"], "place": ["left", "right", "above", "below"]}
IMAGE_ROLE = "IMAGE"  # the role of every image token of a decoder's prompt

# ------------------------------------------------------------------ schema (checked by load_config)
@dataclass
class ProbeVQAData:
    num_pairs: int = 24  # minimal pairs of the held-out world, cycling through the kinds
    kinds: List[str] = field(default_factory=lambda: ["colour", "shape", "size", "side"])
    manifest: Optional[str] = None  # JSONL: id, clean_image, corrupt_image, question, answer, wrong_answer
    corruption: List[str] = field(default_factory=lambda: ["image", "text"])  # image (SMP), text (STR), noise (baseline)
    noise_std: float = 0.5  # Gaussian-noise baseline, in normalised pixel units


@dataclass
class ProbeVQASettings:
    towers: List[str] = field(default_factory=list)  # none named: every probe tower of the model's adapter
    sites: List[str] = field(default_factory=list)  # none named: every site of each tower
    direction: str = "denoise"
    vision_positions: str = "all"  # image tokens one at a time (each: one forward of the whole model per token) or all
    batch_size: int = 256
    min_gap: float = 1e-3
    top_heads: int = 3  # cross-attention heads drawn over the image
    head_ranking: str = "notice"  # notice: P(answer) with one head patched at the answer token | effect: |effect|, all positions


@dataclass
class ProbeVQAConfig:
    task: str = "probe_vqa"
    seed: int = 0
    threads: Optional[int] = None  # intra-op threads per process; unset: the first run's (kept in run.json)
    output_dir: str = "runs/probe_shapes_vqa"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: ProbeVQAData = field(default_factory=ProbeVQAData)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="builtin:shapes-blip-vqa"))
    probe: ProbeVQASettings = field(default_factory=ProbeVQASettings)
    trainer: Dict[str, Any] = field(default_factory=dict)


#: this module's tasks and their schemas
SCHEMAS = {"probe_vqa": ProbeVQAConfig}


class PairItems(Dataset):
    """Probing pairs as model inputs, through the family adapter's preprocessing; a pair that cannot be made or read
    becomes ``{"id", "failure"}``.

    ``skip(ids)`` leaves out pairs already probed (a resumed run); a pair keeps its index in the whole list,
    which its noise seed and its place in the results follow.
    """

    def __init__(self, pairs: list[VQAPair], adapter: Any):
        self.pairs, self.adapter = pairs, adapter
        self.order = list(range(len(pairs)))

    def skip(self, ids: set[str]) -> None:
        self.order = [i for i, pair in enumerate(self.pairs) if pair.id not in ids]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.order[position]
        pair = self.pairs[index]
        adapter = self.adapter
        try:
            clean = adapter.question_inputs(pair.clean_image(), pair.question)
            corrupt = adapter.question_inputs(pair.corrupt_image(), pair.question)
            if corrupt.ids != clean.ids:
                raise ValueError("the corrupted image gives another prompt than the clean one (another size: Qwen2-VL "
                                 "gives each picture its own number of image tokens); patching needs equal prompts")
            shared, answers = decision_tokens(adapter, pair.answer, pair.wrong)
        except (ValueError, OSError) as err:
            return {"index": index, "id": pair.id, "failure": str(err)}
        prompt = [*clean.ids, *shared]  # a decoder reads the answers' shared first tokens, then decides
        ids = torch.tensor([prompt])
        pieces = adapter.token_strings(prompt)
        item = {
            "index": index, "id": pair.id, "kind": pair.kind, "question": pair.question, "answers": answers,
            "clean": {**adapter.join_inputs([clean.image]), "input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "corrupt_image": adapter.join_inputs([corrupt.image]),
            "roles": [*prompt_roles(adapter, clean, pieces, pair.roles), *["ANSWER_PREFIX"] * len(shared)],
        }
        item["answer_position"] = answer_position(pieces, adapter.token_strings(adapter.answer_inputs(pair.answer)))
        if IMAGE_ROLE in item["roles"]:  # a decoder: the image's tokens are prompt positions, drawn on its grid
            cells, grid = adapter.image_keys(adapter.default_probe_tower("text"), item["clean"])
            item["image_cells"], item["image_grid"] = cells.tolist(), list(grid)
        words = OPTION_WORDS.get(pair.kind, [])
        try:
            question = symmetric_token_replacement(
                adapter.tokenizer, pair.question, [pair.answer, pair.wrong], [w for w in words if w not in (pair.answer, pair.wrong)]
            )
            item["corrupt_ids"] = torch.tensor([[*adapter.question_inputs(pair.clean_image(), question).ids, *shared]])
        except ValueError as err:
            item["text_failure"] = str(err)
        return item


def decision_tokens(adapter: Any, answer: str, wrong: str) -> tuple[list[int], tuple[int, int]]:
    """(the tokens both answer words start with, (the first token where they differ, right then wrong)). A decoder
    VLM reads the shared tokens after the prompt and decides at the next one; BLIP VQA decides at its answer
    decoder's first step, so there the words must differ in their first token."""
    right, other = adapter.answer_inputs(answer), adapter.answer_inputs(wrong)
    shared = next((i for i, (a, b) in enumerate(zip(right, other)) if a != b), None)
    if shared is None:
        raise ValueError(f"the answers {answer!r} and {wrong!r} have no token where they differ")
    if shared and getattr(adapter, "image_token_id", None) is None:
        raise ValueError(f"the answers {answer!r} and {wrong!r} start with the same token, and this model decides at "
                         "its answer's first token")
    return list(right[:shared]), (right[shared], other[shared])


def prompt_roles(adapter: Any, question: Any, pieces: list[str], word_roles: tuple[str, ...]) -> list[str]:
    """One role per prompt token, what effects are averaged by: the question's words take their template roles
    (``NOUN``, ``OPTION_A``, ...; their own text where the words split into pieces or the pair has no roles), image
    tokens ``IMAGE``, and every other token (chat template, [CLS], [SEP]) its own text, numbered from its second
    time on (``:`` after ``user`` and ``:#2`` after ``assistant``, the position that predicts the answer)."""
    words = [i for i, shown in enumerate(question.visible) if shown]
    named = dict(zip(words, word_roles)) if len(words) == len(word_roles) else {}
    image = getattr(adapter, "image_token_id", None)
    roles, seen = [], {}
    for i, token in enumerate(question.ids):
        role = named.get(i) or (IMAGE_ROLE if token == image else None)
        if role is None:
            text = clean_token(pieces[i])
            seen[text] = seen.get(text, 0) + 1
            role = text if seen[text] == 1 else f"{text}#{seen[text]}"
        roles.append(role)
    return roles


def _pairs(cfg: DictConfig) -> tuple[list[VQAPair], list[dict], int]:
    """The pairs to probe, the records that failed up front, and how many world candidates could not be paired.

    From the world: ``num_pairs`` split evenly over the kinds; a question whose answer no change of the scene
    can flip (two large objects leave no room to swap sides) is passed over for the next one of its kind.
    """
    if cfg.data.manifest:
        pairs, failures = read_vqa_pairs(cfg.data.manifest)
        return pairs, [f.to_json() for f in failures], 0
    world, made, passed_over = world_of(cfg), [], 0
    per_kind = -(-cfg.data.num_pairs // len(cfg.data.kinds))
    for kind in cfg.data.kinds:
        vqa, index, count = ShapesVQA(world, (kind,)), 0, 0
        while count < per_kind and index < 50 * per_kind:
            try:
                pair = vqa_minimal_pair(vqa, index)
                made.append(replace(pair, id=f"{kind}-{world.seed}-{index}"))
                count += 1
            except ValueError:
                passed_over += 1
            index += 1
    return made, [], passed_over


def run(cfg: DictConfig) -> dict[str, Any]:
    unknown = set(cfg.data.corruption) - {"image", "text", "noise"}
    if unknown or set(cfg.data.kinds) - set(TWO_CHOICE_KINDS):
        raise ConfigError(f"data.corruption takes image, text, noise and data.kinds {TWO_CHOICE_KINDS}; got {cfg.data.corruption}, {cfg.data.kinds}")
    adapter = backbone_of(cfg, "questions")
    with loading(cfg):
        require(adapter, "probing", f"a train.py {cfg.task} run")
    cfg.probe.towers, cfg.probe.sites = probed_towers_and_sites(cfg, adapter)
    out = Path(cfg.output_dir)
    pairs, upfront_failures, passed_over = _pairs(cfg)
    module = VQAProbing(adapter, cfg.probe, list(cfg.data.corruption), cfg.data.noise_std, cfg.seed)
    items, parts = PairItems(pairs, adapter), out / "parts"

    def resume(trainer: L.Trainer, done: set[str]) -> None:  # once the output is owned: what earlier runs probed
        items.skip({pair.id for pair in pairs if part_path(parts, pair.id).exists()})

    owner = output_owner(cfg, RESULT_KEYS, adapter.module, on_owned=(resume,))
    trainer = owned_trainer(cfg, owner, [PairRecordWriter(parts)])
    loader = DataLoader(items, batch_size=1, collate_fn=list)
    start = time.perf_counter()
    try:
        trainer.predict(module, loader, return_predictions=False)
        trainer.strategy.barrier()  # every rank's pairs are written before rank 0 merges
        if trainer.global_rank != 0:
            return {}
        return _merge(cfg, out, trainer, parts, upfront_failures, adapter, pairs, passed_over, start, len(items))
    finally:
        owner.release()


def probed_towers_and_sites(cfg: DictConfig, adapter: Any) -> tuple[list[str], list[str]]:
    """``probe.towers`` and ``probe.sites``, each the adapter's all where none is named; a tower the adapter lacks,
    or a site none of the towers has, is a config error naming what the adapter offers."""
    towers = list(cfg.probe.towers) or list(adapter.probe_towers)
    unknown = [t for t in towers if t not in adapter.probe_towers]
    if unknown:
        raise ConfigError(f"probe.towers: {unknown} are not probe towers of {type(adapter).__name__}; it has "
                          f"{list(adapter.probe_towers)}")
    offered = list(dict.fromkeys(site for t in towers for site in adapter.probe_sites(t)))
    sites = list(cfg.probe.sites) or offered
    unknown = [site for site in sites if site not in offered]
    if unknown:
        raise ConfigError(f"probe.sites: {unknown} are sites of none of the towers {towers} of "
                          f"{type(adapter).__name__}; they have {offered}")
    return towers, sites


def part_path(parts: Path, pair_id: str, failed: bool = False) -> Path:
    """Where one probed pair's record is kept (``failed``: a pair that could not be probed, retried by a rerun)."""
    return parts / f"{'failed-' if failed else ''}{safe_name(pair_id)}.pt"


class PairRecordWriter(L.Callback):
    """Saves each probed pair's record as soon as its batch ends (atomically), so a killed run loses at most the
    pair in flight and a rerun probes only the pairs without a record."""

    def __init__(self, parts: Path):
        self.parts = parts

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for record in outputs:
            path = part_path(self.parts, record["id"], failed="failure" in record)
            atomic_write(path, lambda tmp, record=record: torch.save(record, tmp))


def _merge(cfg, out, trainer, parts, upfront_failures, adapter, pairs, passed_over, start, probed) -> dict[str, Any]:
    """Rank 0: every pair's record, this run's and earlier runs', in pair order (a failure only where no record is)."""
    records = []
    for pair in pairs:
        for path in (part_path(parts, pair.id), part_path(parts, pair.id, failed=True)):
            if path.exists():
                records.append(torch.load(path, weights_only=True))
                break
    summary = _aggregate(cfg, out, records, upfront_failures, adapter, pairs, trainer)
    summary["world_questions_passed_over"] = passed_over
    summary["probed_now"], summary["probed_before"] = probed, len(records) - probed
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    _print(summary)
    return summary


def _aggregate(cfg, out: Path, records: list[dict], upfront: list[dict], adapter, pairs, trainer) -> dict[str, Any]:
    done = [r for r in records if "failure" not in r]
    failures = upfront + [{"id": r["id"], "reason": r["failure"]} for r in records if "failure" in r]
    failures += [{"id": r["id"], "corruption": c, "reason": why} for r in done for c, why in r["skipped"].items()]
    tensors, groups, flagged, important, ranked = {}, {}, {}, {}, {}
    for r in done:
        for key, result in r["results"].items():
            groups.setdefault(key, []).append((r, result))
    figures = {}
    prompt_tower = adapter.default_probe_tower("text")  # the tower whose positions are the prompt's tokens
    for key, entries in sorted(groups.items()):
        corruption, tower, site = key.split("/")
        results = [_as_result(res, site) for _, res in entries]
        mean, raw, count = mean_effect(results)
        flagged[key] = [r["id"] for r, res in entries if res["flagged"]]
        tensors[f"{key}/raw"] = raw.contiguous()
        if site.endswith("head"):
            ranking, scored = head_ranking(cfg, tower == prompt_tower, entries)
            if not scored:
                continue
            ranked[key] = (ranking, scored)
            mean = torch.stack([score for _, score in scored]).mean(0)
            tensors[f"{key}/mean"] = mean.contiguous()
            for kind in sorted({r["kind"] for r, _ in scored}):
                kept = [score for r, score in scored if r["kind"] == kind]
                important[(kind, corruption, tower, site)] = important_heads(torch.stack(kept).mean(0))
            figures[key] = labelled_heatmap(mean, [f"h{h}" for h in range(mean.shape[1])], f"{key}: {RANKING_LABELS[ranking]}, "
                                    "layers x heads", "head")
        elif tower == prompt_tower:  # one template per task: positions are averaged by their role in it
            for kind in sorted({r["kind"] for r, _ in entries}):
                of_kind = [(r, res) for r, res in entries if r["kind"] == kind]
                by_role, roles = effect_by_role([res["effect"] for _, res in of_kind], [r["roles"] for r, _ in of_kind],
                                                [res["flagged"] for _, res in of_kind])
                tensors[f"{key}/{kind}/mean_by_role"] = by_role.contiguous()
                figures[f"{key}/{kind}"] = labelled_heatmap(by_role, roles, f"{key}, {kind} questions: mean effect", "prompt role")
            if corruption != "text" and "image_cells" in entries[0][0]:  # the image's tokens in the prompt
                maps = image_token_effects(entries)
                tensors[f"{key}/image_token_effect"] = maps.contiguous()
                figures[f"{key}/image_tokens"] = image_token_figure(key, maps, entries, pairs)
        else:
            tensors[f"{key}/mean"] = mean.contiguous()
            columns = [str(i) for i in range(mean.shape[1])] if mean.shape[1] > 1 else ["all tokens"]
            figures[key] = labelled_heatmap(mean, columns, f"{key}: mean effect, layers x image tokens", "image token")
    atomic_write(out / "effects.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    figure_dir = out / "figures"
    figure_dir.mkdir(exist_ok=True)
    for key, png in figures.items():
        atomic_write(figure_dir / f"{key.replace('/', '_')}.png", png)
    universal = universal_heads(important)
    _write_heads_csv(out, ranked, important)
    overlays = _head_overlays(cfg, adapter, pairs, done, important, figure_dir)
    _log_figures(trainer, {**figures, **overlays})
    accuracy = {}
    for kind in sorted({r["kind"] for r in done}):
        of_kind = [r["correct"] for r in done if r["kind"] == kind]
        accuracy[kind] = round(sum(of_kind) / len(of_kind), 4)
    return {
        "output_dir": str(out), "pairs": len(done), "failed": failures,
        "accuracy_on_clean_pairs": accuracy,
        "flagged_pairs": {k: v for k, v in flagged.items() if v},
        "important_heads": {"/".join(k): [list(h) for h in v] for k, v in sorted(important.items())},
        "universal_heads": {k: [list(h) for h in v] for k, v in universal.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _as_result(res: dict, site: str) -> PatchingResult:
    """The stored scores as a result for ``mean_effect``."""
    unused = torch.zeros(())
    return PatchingResult(res["effect"], res["patched_ld"], unused, res["clean_ld"], res["corrupt_ld"], 0.0, 0.0, res["flagged"], site, "")


RANKING_LABELS = {"notice": "mean restoration probability at the answer token (NOTICE)",
                  "effect": "mean |effect|, all positions patched"}


def head_ranking(cfg: DictConfig, prompt: bool, entries: list) -> tuple[str, list[tuple[dict, torch.Tensor]]]:
    """The statistic heads of one group are ranked by, and each pair's (layers, heads) scores under it.

    NOTICE's (``probe.head_ranking=notice``) for the heads of the tower that reads the prompt (``prompt``: BLIP's
    text encoder, a decoder's language model), over the pairs that have an answer token (NOTICE also chose its
    pairs among those the model answers correctly: the summary's accuracy says how many are); ours (|effect| with
    every position patched) for vision-tower heads, which have no answer token, and when asked.
    """
    ranking = cfg.probe.head_ranking if prompt else "effect"
    scored = []
    for record, result in entries:
        score = head_scores(result, ranking, record.get("answer_position"))
        if score is not None:
            scored.append((record, score))
    return ranking, scored


def _write_heads_csv(out: Path, ranked: dict, important: dict) -> None:
    rows = []
    for key, (ranking, scored) in sorted(ranked.items()):
        corruption, tower, site = key.split("/")
        mean = torch.stack([score for _, score in scored]).mean(0)
        order = mean.flatten().argsort(descending=True, stable=True).tolist()
        heads = mean.shape[1]
        for rank, flat in enumerate(order, 1):
            layer, head = divmod(flat, heads)
            tasks = [k[0] for k, v in important.items() if k[1:] == (corruption, tower, site) and (layer, head) in v]
            rows.append([tower, site, corruption, ranking, rank, layer, head, f"{mean[layer, head].item():.6f}", ";".join(tasks)])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["tower", "site", "corruption", "statistic", "rank", "layer", "head", "score", "important_in_tasks"])
    writer.writerows(rows)
    atomic_write(out / "heads.csv", buffer.getvalue())


def image_token_effects(entries: list) -> torch.Tensor:
    """(pairs, layers, rows, cols): each pair's effect of patching each of the prompt's image tokens, on the image's
    token grid."""
    maps = []
    for record, result in entries:
        rows, cols = record["image_grid"]
        maps.append(result["effect"][:, record["image_cells"]].reshape(-1, rows, cols))
    return torch.stack(maps)


def image_token_figure(key: str, maps: torch.Tensor, entries: list, pairs: list) -> bytes:
    """The first pair of each kind: its picture under the effect of patching each image token, one tile per layer."""
    from ..viz.figures import image_token_effect_figure

    rows = []
    for kind in sorted({r["kind"] for r, _ in entries}):
        index = next(i for i, (r, _) in enumerate(entries) if r["kind"] == kind)
        record = entries[index][0]
        rows.append((f"{kind}: {pairs[record['index']].question}", pairs[record["index"]].clean_image(), maps[index]))
    return image_token_effect_figure(rows, f"{key}: effect of patching each image token (where the decision is read)")


def _head_overlays(cfg, adapter, pairs, done, important, figure_dir: Path) -> dict[str, bytes]:
    """For the top heads of the tower that reads the prompt (BLIP VQA's cross-attention heads, a decoder's
    language-model heads): the attention of the question's noun over the image, minus the mean over heads, on the
    first pair of each task (NOTICE's reading of head functions)."""
    from ..viz.figures import overlay

    tower = adapter.default_probe_tower("text")
    head_sites = [s for s in adapter.probe_sites(tower) if s.endswith("head")]
    if not head_sites or not hasattr(adapter, "image_keys"):  # an adapter of one's own may not say where the image is
        return {}
    site = head_sites[-1]  # the heads head_attention returns
    ranked: dict[tuple[int, int], int] = {}
    for (kind, corruption, at, of), heads in important.items():
        if (at, of) == (tower, site):
            for h in heads:
                ranked[tuple(h)] = ranked.get(tuple(h), 0) + 1
    top = sorted(ranked, key=lambda h: (-ranked[h], h))[: cfg.probe.top_heads]
    if not top:
        return {}
    examples = []
    for kind in cfg.data.kinds:
        record = next((r for r in done if r["kind"] == kind), None)
        if record is not None:
            examples.append((record, pairs[record["index"]]))
    tiles = []
    for record, pair in examples:
        image = pair.clean_image()
        question = adapter.question_inputs(image, pair.question)
        ids = torch.tensor([question.ids])
        inputs = {**adapter.join_inputs([question.image]), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        probs = adapter.head_attention(tower, inputs)
        roles = record["roles"]  # the object's noun, else its colour naming it ("the red object"), else the first token
        position = next((roles.index(r) for r in ("NOUN", "NOUN_COLOUR") if r in roles), 0)
        word = clean_token(adapter.token_strings(question.ids)[position])  # the query token the attention is read at
        keys, (rows, cols) = adapter.image_keys(tower, inputs)
        picture = np.asarray(image.convert("RGB").resize((cols * 24, rows * 24), Image.NEAREST))
        for layer, head in top:
            attention = probs[layer][0, :, position, keys.to(probs[layer].device)]  # (heads, image cells)
            difference = (attention[head] - attention.mean(0)).view(1, 1, rows, cols)
            heat = torch.nn.functional.interpolate(difference, size=picture.shape[:2], mode="nearest")[0, 0].clamp_min(0)
            heat = heat / (heat.max() + 1e-12)  # where the head looks more than the heads do on average; 0 elsewhere
            tiles.append((f"{record['kind']}: layer {layer} head {head} at '{word}'",
                          overlay(picture, heat.numpy(), alpha=0.75, by_value=True)))
    figure = tile_figures(tiles, columns=len(top), scale="head's attention above the mean over heads, per tile")
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    atomic_write(figure_dir / "head_overlays.png", buffer.getvalue())
    return {"head_overlays": buffer.getvalue()}


def _log_figures(trainer: L.Trainer, figures: dict[str, bytes]) -> None:
    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if logger is None:
        return
    for name, png in figures.items():
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        logger.experiment.add_image(f"probe/{name}", image, 0, dataformats="HWC")
    logger.experiment.flush()


def _print(summary: dict[str, Any]) -> None:
    print(f"\nNOTICE probing of {summary['config']['model']['name_or_path']}: {summary['output_dir']} "
          f"({summary['pairs']} pairs, {summary['wall_time_s']} s)")
    print(f"  accuracy on the clean pairs: {summary['accuracy_on_clean_pairs']}")
    print(f"  universal heads (layer, head) per tower/site: {summary['universal_heads']}")
    print(f"  failed or skipped: {len(summary['failed'])}; flagged groups: {list(summary['flagged_pairs'])}")
    print(f"  effects.safetensors, heads.csv, figures/, TensorBoard: tensorboard --logdir {summary['output_dir']}/tensorboard\n")
