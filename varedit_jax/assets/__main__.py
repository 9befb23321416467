"""`python -m varedit_jax.assets` (config JSON on stdin): builds the toy assets of a training config
(`assets.build_in_child` runs it before a multi-process run joins jax.distributed)."""
import json
import sys

import ml_collections

from varedit_jax import assets

if __name__ == "__main__":
    assets.resolve(ml_collections.ConfigDict(json.loads(sys.stdin.read())))
