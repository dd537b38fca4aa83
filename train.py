"""The one entry point: python train.py [CONFIG.yaml] [key=value ...].

Without a config file it runs configs/default.yaml: M2IB on held-out pairs of
the shapes world with the shipped small CLIP, offline.
"""

from __future__ import annotations

import errno
import sys

from m2ib_lightning.config import ConfigError, describe_config, describe_registered, describe_tasks, load_config
from m2ib_lightning.results import OutputRefused
from m2ib_lightning.tasks import task_module


def main(argv: list[str]) -> int:
    if "--list" in argv:
        print(describe_registered())
        return 0
    helping = bool({"-h", "--help"} & set(argv))
    argv = [a for a in argv if a not in ("-h", "--help")]
    path = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else None
    overrides = argv[1:] if path else argv
    if helping and path is None and not overrides:
        print(describe_tasks())
        return 0
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if helping:  # a config's --help: the values it gives every key
        print(describe_config(cfg, path))
        return 0
    try:
        task_module(cfg.task).run(cfg)
    except (ConfigError, OutputRefused) as err:  # found once the model is known, or the output_dir is refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on device ({err.filename or cfg.output_dir}); what was indexed before is intact: "
              "free space and rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
