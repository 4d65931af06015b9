"""Generate preference pairs with a generator (``--config``), or the toy multi-subject set (``--out``).

    python data_tools/generate_pairs.py --config recipes/pairs_tiny_cpu.yaml [--field value ...]
    python data_tools/generate_pairs.py --out data/toy_pairs --num_pairs 64 --resolution 64
"""

import sys

from focusdpo.cli import pairs_command

if __name__ == "__main__":
    pairs_command(sys.argv[1:])
