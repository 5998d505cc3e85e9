"""Entry point: `python launch.py --config configs/multitask.py[:args] --workdir DIR`.

The trainer (deepcoro_jax/train.py) and the configs are not part of this
version yet, so this script says what is missing and exits with status 1
rather than pretending to train. What works today is the data path:
`make demo` runs synthetic studies -> prepare -> the training input pipeline.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/multitask.py[:args]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.parse_known_args(argv)
    print(
        "launch.py: missing deepcoro_jax/train.py (the trainer) and configs/multitask.py "
        "(the recipe); training is not available in this version. See README.md.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
