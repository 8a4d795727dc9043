"""Stage 2 under the DeepSpeed launcher:

    deepspeed [--hostfile cluster/deepspeed/hostfile] [--num_gpus N] launch/stage2.py --config CONFIG [overrides]

Every rank runs the trainer on the listwise shards (pre-tokenized by the Ray pipeline job: see README), starting
from the stage-1 export (`model.path`), and rank 0 exports the final model. Thin on purpose: no training logic here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `deepspeed launch/stage2.py` runs it as a script

from trainer.__main__ import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("stage=") for a in argv):
        argv.append("stage=2")
    sys.exit(main(argv))
