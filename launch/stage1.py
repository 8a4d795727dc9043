"""Stage 1 as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- python launch/stage1.py --config CONFIG [overrides]

1. Pre-tokenizes the contrastive corpus with the data pipeline when its shards are missing or stale (the manifest's
   config hash, input hashes and tokenizer fingerprint decide), with the model's own tokenizer.
2. Trains stage 1 with Ray Train's TorchTrainer: `ray.workers` workers (GPUs when the cluster has them), each running
   the same trainer with DeepSpeed ZeRO-3. A failed worker group is restarted (FailureConfig) and resumes from the
   last checkpoint (the trainer's exact resume), so the job completes.
Thin on purpose: it builds configs and calls the pipeline and the trainer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.typed_config import ConfigError, from_dict, load, to_dict  # noqa: E402
from data_pipeline.config import PipelineConfig  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402


@dataclass
class RayLaunch:
    workers: int = 2
    use_gpu: str = "auto"  # auto: when the cluster has GPUs
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker-group restarts before the job fails
    storage_path: str = ""  # Ray Train's run folder; default: <train.run.output_dir>/ray


@dataclass
class Stage1Launch:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayLaunch = field(default_factory=RayLaunch)

    def validate(self) -> None:
        if self.ray.workers < 1:
            raise ValueError("ray.workers must be >= 1")


def _worker(config: dict) -> None:
    import ray.train

    from trainer.loop import train

    result = train(from_dict(TrainConfig, config))
    ray.train.report({"step": result["step"], "export": result.get("export", "")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch/stage1.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML with pipeline:, train: and ray: sections (see recipes/)")
    ap.add_argument("overrides", nargs="*", help="e.g. train.run.max_steps=100 ray.workers=8")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the pipeline's progress lines
    try:
        cfg = load(Stage1Launch, args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.train.stage = 1
    cfg.pipeline.kind = "contrastive"
    cfg.pipeline.output = cfg.train.shards
    cfg.pipeline.tokenization.tokenizer = cfg.train.model.path  # shards must match the model's tokenizer
    cfg.pipeline.overwrite = True  # stale shards (other config, inputs or tokenizer) are rebuilt

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline.job import PipelineError
    from data_pipeline.job import run as run_pipeline

    if not os.environ.get("RAY_ADDRESS"):  # a local Ray of its own: token auth with a token of its own
        from common.cpu_allocator import WORKER_ENV
        from common.ray_auth import ensure_local_token

        ensure_local_token()
        for k, v in WORKER_ENV.items():  # inherited by the workers it starts (common/cpu_allocator.py)
            os.environ.setdefault(k, v)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    try:
        if cfg.pipeline.inputs:
            run_pipeline(cfg.pipeline)
        gpu = cfg.ray.use_gpu == "true" or (cfg.ray.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        out = Path(cfg.train.run.output_dir).resolve()
        cfg.train.run.output_dir = str(out)
        cfg.train.shards = str(Path(cfg.train.shards).resolve())
        trainer = TorchTrainer(
            _worker,
            train_loop_config=to_dict(cfg.train),
            scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(name="stage1", storage_path=cfg.ray.storage_path or str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
        )
        result = trainer.fit()
        print(f"[stage1] finished: {result.metrics}")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
