"""The one entry point: python train.py [CONFIG.yaml] [key=value ...].

The configured runs (the embedded default, manifests, training the shipped
model) are being built; until then this prints what exists.
"""

import sys

NOTICE = """m2ib-lightning: the default run is not there yet.

What works today is the attribution engine:

    import m2ib_lightning
    result = m2ib_lightning.attribute(clip_model, pixel_values, input_ids, attention_mask)
    result.image_maps, result.text_maps

See README.md. `make test` runs the tests, `make bench` the engine benchmark.
"""


def main(argv: list[str]) -> int:
    print(NOTICE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
