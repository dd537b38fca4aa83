"""M2IB explaining answers on the shapes world: does the image map point at the object a question is about?

For held-out questions (colour, shape and size kinds, two-choice and open), the image map of M2IB explaining the
right answer is scored against the questioned object's mask (pointing game, energy in the mask), next to random
maps, at each vision layer; one table row per layer.

    python benchmarks/bench_answers.py [--model builtin:shapes-blip-vqa] [--layers 0,1,2,3] [--questions 48] [--precision bf16]
    python benchmarks/bench_answers.py --model builtin:shapes-llava --layers 0 --explainer runs/fit_explainer_llava/explainer

With ``--explainer`` (an amortised explainer of the model's answers, trained by ``configs/fit_explainer.yaml`` on an
exact ``attribute_vqa`` run), a second table puts it beside exact M2IB at the explainer's own settings: pointing
game, energy, and rank agreement with the exact fit at noise seed 0, next to that of the exact fit at seed 1 (how
much of an exact map is its noise draw).

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
    parser.add_argument("--explainer", help="an amortised explainer of this model's answers: compared with exact M2IB")
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
    if args.explainer:
        explainer_table(model, args, pixels, questions, answers, masks)


def explainer_table(model, args, pixels, questions, answers, masks) -> None:
    """The amortised explainer against exact M2IB at its settings (seeds 0 and 1) on the same questions."""
    from m2ib_lightning.amortised import AmortisedAnswerM2IB, ExplainerNetwork, masked_agreement
    from m2ib_lightning.engine import M2IBConfig

    network = ExplainerNetwork.from_pretrained(args.explainer)
    config = M2IBConfig(**{**network.config.m2ib, "precision": args.precision})
    amortised = AmortisedAnswerM2IB(model, network, m2ib=config)
    explained = (pixels, questions["input_ids"], questions["attention_mask"])
    answer = {"answer_ids": answers["input_ids"], "answer_mask": answers["attention_mask"]}
    results, seconds = {}, {}
    for name, seed in (("exact M2IB, noise seed 0", 0), ("exact M2IB, noise seed 1", 1), ("amortised", None)):
        start = time.perf_counter()
        if seed is None:
            results[name] = amortised.attribute(*explained, **answer)
        else:
            results[name] = attribute(model.module, *explained, **answer, vision_layer=config.vision_layer,
                                      text_layer=config.text_layer, beta=config.beta, steps=config.steps, lr=config.lr,
                                      num_noise=config.num_noise, precision=config.precision, seed=seed)
        seconds[name] = (time.perf_counter() - start) / len(masks)
    reference = results["exact M2IB, noise seed 0"]
    n = len(masks)
    se = lambda x: (x.std() / n**0.5).item()  # noqa: E731
    print(f"\n{args.explainer} (vision layer {config.vision_layer}, text layer {config.text_layer}) beside exact M2IB; "
          "rank agreement with the exact fit at noise seed 0 on the patch grid and over the question's tokens\n")
    print("| method | pointing game | energy in mask | median Spearman rho image / text | peak in the exact top 10% | s / question |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        pg, en = pointing_game(result.image_maps, masks), mask_energy(result.image_maps, masks)
        if result is reference:
            agree = "– | –"
        else:
            values = masked_agreement(result.image_patch_capacity.flatten(1), reference.image_patch_capacity.flatten(1),
                                      torch.ones_like(reference.image_patch_capacity.flatten(1), dtype=torch.bool),
                                      result.text_capacity, reference.text_capacity, reference.text_positions)
            rho = {k: values[k][~values[k].isnan()].median().item() for k in ("image_spearman", "text_spearman")}
            agree = f"{rho['image_spearman']:.3f} / {rho['text_spearman']:.3f} | {values['image_peak_in_top'].mean():.3f}"
        print(f"| {name} | {pg.mean():.3f} ± {se(pg):.3f} | {en.mean():.3f} ± {se(en):.3f} | "
              f"{agree} | {seconds[name]:.3f} |")


def question_batch(model, items) -> tuple[torch.Tensor, dict, dict]:
    """Pixel values, questions and answers of shapes-world questions, through the adapter's own preprocessing."""
    inputs = [model.question_inputs(it.sample.image, it.question.text) for it in items]
    pixels = model.join_inputs([q.image for q in inputs])["pixel_values"]
    ids, mask = pad_token_ids([q.ids for q in inputs], model.pad_token_id)
    answer_ids, answer_mask = pad_token_ids([model.answer_inputs(it.question.answer) for it in items], model.pad_token_id)
    return pixels, {"input_ids": ids, "attention_mask": mask}, {"input_ids": answer_ids, "attention_mask": answer_mask}


if __name__ == "__main__":
    main()
