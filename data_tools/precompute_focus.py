"""Precompute static focus maps (DINOv2 correspondence, complexity) into a pair dataset.

    python data_tools/precompute_focus.py --config recipes/X.yaml --out data/pairs_with_focus
Then train with ``dataset: data/pairs_with_focus``; a cache made with other settings is refused.
"""

import sys

from focusdpo.mapper import precompute_main

if __name__ == "__main__":
    precompute_main(sys.argv[1:])
