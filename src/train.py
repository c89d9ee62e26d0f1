"""Entry point from a checkout (installed: `cai-train`): compose the Hydra config, then run the
pipeline's stages (cai.cli.train).

python src/train.py                                   # default stages, embedded SmolLM2-135M
python src/train.py model=tiny pipeline.stages=[generate_sl]   # tiny CPU smoke run (seconds)
python src/train.py -m model=size_sweep               # one job per model size
python src/train.py --help                            # config groups and options
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAI_ROOT", str(ROOT))  # results/, outputs/ of this checkout
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing too

from cai.cli import train  # noqa: E402

if __name__ == "__main__":
    train()
