"""Generate the toy multi-subject pair set (instance disruption) into a dataset folder.

    python data_tools/generate_pairs.py --out data/toy_pairs --num_pairs 64 --resolution 64
"""

import sys

from focusdpo.cli import pairs_command

if __name__ == "__main__":
    pairs_command(sys.argv[1:])
