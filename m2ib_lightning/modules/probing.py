"""The NOTICE probing run's LightningModule: every pair of a predict batch probed with every configured corruption,
tower and site, through the family adapter."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from ..probing import ActivationPatching, gaussian_noise
from ..probing.patching import PatchingResult


class VQAProbing(L.LightningModule):
    """Probes every pair of a predict batch with every configured corruption, tower and site."""

    def __init__(self, adapter: Any, probe: DictConfig, corruptions: list[str], noise_std: float, seed: int):
        super().__init__()
        self.model, self.adapter = adapter.module, adapter
        self.probe = ActivationPatching(adapter, batch_size=probe.batch_size, min_gap=probe.min_gap)
        self.settings, self.corruptions, self.noise_std, self.seed = probe, corruptions, noise_std, seed
        self.prompt_tower = adapter.default_probe_tower("text")  # the tower whose positions are the prompt's tokens

    def _inputs(self, item: dict[str, Any], corruption: str) -> tuple[dict, dict] | str:
        clean = {k: v.to(self.device) for k, v in item["clean"].items()}
        if corruption == "image":
            return clean, {**clean, **{k: v.to(self.device) for k, v in item["corrupt_image"].items()}}
        if corruption == "noise":
            return clean, {**clean, "pixel_values": gaussian_noise(clean["pixel_values"], self.noise_std, self.seed + item["index"])}
        if "text_failure" in item:
            return item["text_failure"]
        return clean, {**clean, "input_ids": item["corrupt_ids"].to(self.device)}

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        out = []
        for item in batch:
            if "failure" in item:
                out.append({"index": item["index"], "id": item["id"], "failure": item["failure"]})
                continue
            record = {"index": item["index"], "id": item["id"], "kind": item["kind"], "roles": item["roles"], "results": {},
                      "skipped": {}, "answer_position": item["answer_position"],
                      **{k: item[k] for k in ("image_cells", "image_grid") if k in item}}
            prompt_tower = self.prompt_tower
            with torch.no_grad():
                clean = {k: v.to(self.device) for k, v in item["clean"].items()}
                logits = self.adapter.decision_logits(clean, 1, self.adapter.default_probe_tower("image"))
            record["correct"] = int(logits.argmax(-1).item() == item["answers"][0])
            for corruption in self.corruptions:
                inputs = self._inputs(item, corruption)
                if isinstance(inputs, str):
                    record["skipped"][corruption] = inputs
                    continue
                modality = "text" if corruption == "text" else "image"
                for tower in self.settings.towers:
                    if tower != prompt_tower and modality == "text":
                        continue  # text corruption cannot reach the vision tower
                    for site in self.settings.sites:
                        if site not in self.adapter.probe_sites(tower):
                            continue
                        if site.endswith("head"):  # NOTICE ranks the prompt tower's heads one token at a time
                            each = tower == prompt_tower and self.settings.head_ranking == "notice"
                        else:
                            each = tower == prompt_tower or self.settings.vision_positions == "each"
                        positions = "each" if each else "all"
                        result = self.probe.run(*inputs, answers=tuple(item["answers"]), modality=modality, site=site,
                                                tower=tower, positions=positions, direction=self.settings.direction)
                        record["results"][f"{corruption}/{tower}/{site}"] = _compact(result)
            out.append(record)
        return out


def _compact(result: PatchingResult) -> dict[str, Any]:
    return {"effect": result.effect.float().cpu(), "patched_ld": result.patched_ld.float().cpu(),
            "patched_prob": result.patched_prob.float().cpu(),
            "clean_ld": result.clean_ld, "corrupt_ld": result.corrupt_ld, "flagged": result.flagged}
