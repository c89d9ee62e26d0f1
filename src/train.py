"""Entry point: compose the Hydra config, then run the pipeline's stages.

python src/train.py                                   # default stages, embedded SmolLM2-135M
python src/train.py model=tiny pipeline.stages=[generate_sl]   # tiny CPU smoke run (seconds)
python src/train.py -m model=size_sweep               # one job per model size
python src/train.py --help                            # config groups and options
"""

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("CAI_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

log = logging.getLogger("cai")
# the run folder's name (conf/hydra/default.yaml) carries the process id: unique per run
OmegaConf.register_new_resolver("cai_pid", os.getpid, replace=True, use_cache=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cai.errors import CAIError
    from cai.pipeline import run_from_config

    try:
        run_from_config(cfg)
    except CAIError as error:  # one clear message, no traceback
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
