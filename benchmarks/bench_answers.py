"""M2IB explaining answers on the shapes world: does the image map point at the object a question is about?

For held-out questions (colour, shape and size kinds, two-choice and open), the image map of M2IB explaining the
right answer is scored against the questioned object's mask (pointing game, energy in the mask), next to random
maps, at each vision layer; one table row per layer.

    python benchmarks/bench_answers.py [--model builtin:shapes-blip-vqa] [--layers 0,1,2,3] [--questions 48] [--precision bf16]

Any answer adapter with the questions capability (BLIP VQA, LLaVA): the prompt is the adapter's own (chat template,
image placeholder expanded).
"""

from __future__ import annotations

import argparse
import time

import torch

from m2ib_lightning import attribute
from m2ib_lightning.backbones import load_backbone
from m2ib_lightning.shapes.questions import ShapesVQA
from m2ib_lightning.shapes.world import ShapesWorld
from m2ib_lightning.backbones.base import pad_token_ids
from m2ib_lightning.metrics import mask_energy, pointing_game

KINDS = ("colour", "shape", "size", "what_colour", "what_shape", "what_size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:shapes-blip-vqa")
    parser.add_argument("--layers", default="0,1,2,3")
    parser.add_argument("--text-layer", type=int, default=1)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--world-seed", type=int, default=2)  # used neither in training nor in validation
    parser.add_argument("--precision", choices=["32", "bf16"], default="32", help="m2ib.precision of the fits")
    args = parser.parse_args()
    model = load_backbone(args.model)
    vqa = ShapesVQA(ShapesWorld(seed=args.world_seed, image_size=64, max_objects=3, noise=0.03), KINDS)
    items = [vqa.sample(i) for i in range(args.questions)]
    pixels, questions, answers = question_batch(model, items)
    masks = torch.stack([torch.as_tensor(it.sample.object_masks[it.question.target]) for it in items])
    random = torch.rand(masks.shape, generator=torch.Generator().manual_seed(0))
    n = len(items)
    se = lambda x: (x.std() / n**0.5).item()  # noqa: E731
    rp, re = pointing_game(random, masks), mask_energy(random, masks)
    print(f"{n} questions ({', '.join(KINDS)}), world seed {args.world_seed}, {args.model}, text layer {args.text_layer}; "
          f"beta 0.1, 10 steps, 10 noise copies, precision {args.precision}; mean ± standard error\n")
    print("| vision layer | pointing game | energy in mask | random: pointing / energy | s / pair |")
    print("|---|---|---|---|---|")
    for layer in map(int, args.layers.split(",")):
        start = time.perf_counter()
        result = attribute(model.module, pixels, questions["input_ids"], questions["attention_mask"],
                           answer_ids=answers["input_ids"], answer_mask=answers["attention_mask"],
                           vision_layer=layer, text_layer=args.text_layer, beta=0.1, steps=10, num_noise=10, seed=0,
                           precision=args.precision)
        seconds = (time.perf_counter() - start) / n
        pg, en = pointing_game(result.image_maps, masks), mask_energy(result.image_maps, masks)
        print(f"| {layer} | {pg.mean():.3f} ± {se(pg):.3f} | {en.mean():.3f} ± {se(en):.3f} | "
              f"{rp.mean():.3f} / {re.mean():.3f} | {seconds:.2f} |")


def question_batch(model, items) -> tuple[torch.Tensor, dict, dict]:
    """Pixel values, questions and answers of shapes-world questions, through the adapter's own preprocessing."""
    inputs = [model.question_inputs(it.sample.image, it.question.text) for it in items]
    pixels = model.join_inputs([q.image for q in inputs])["pixel_values"]
    ids, mask = pad_token_ids([q.ids for q in inputs], model.pad_token_id)
    answer_ids, answer_mask = pad_token_ids([model.answer_inputs(it.question.answer) for it in items], model.pad_token_id)
    return pixels, {"input_ids": ids, "attention_mask": mask}, {"input_ids": answer_ids, "attention_mask": answer_mask}


if __name__ == "__main__":
    main()
