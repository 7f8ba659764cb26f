"""``torchrun --nproc-per-node N -m moeforge.train CONFIG [--set k=v …] [--resume]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moeforge.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeforge.train", description=__doc__)
    ap.add_argument("config", help="training config YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value override")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run in out_dir")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank: never outlive the agent that started it
        from moeforge.procs import die_with_parent

        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from moeforge.train.run import run_training

    try:
        result = run_training(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
