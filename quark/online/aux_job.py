"""The auxiliary model's job in ACFT's parallel scheme (``acft_parallel``).

The paper updates the auxiliary model and the LLM at the same time, each from the other's
latest checkpoint. Here that is two kinds of job that run concurrently on different workers:

- this job trains the head R for the **active** version, on labelled samples of that
  version's default output, warm-started from the newest head of an earlier version, and
  publishes it beside the version (``HeadStore``); one head per version, so a re-run is a no-op;
- an ACFT LLM job (``quark.online.acft_job``) with ``acft_parallel`` skips its own head
  training: it uses the newest published head and builds q from the version that head was
  trained for (q = p_v * R_v, the constrained distribution of v), however far the policy
  has moved since. That lag is the price of the concurrency; the paper's is one iteration.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quark.acft.head import save_head
from quark.acft.training import AuxTrainer
from quark.models import frozen_copy
from quark.online.acft_job import ACFTJob
from quark.online.job import NoActiveVersion, split_window


@dataclass
class AuxJob(ACFTJob):
    """Trains and publishes the auxiliary head of the active version."""

    def run(self) -> dict[str, Any]:
        started = time.time()
        heads = self._heads()
        version = self.deps.store.active()
        if version is None:
            raise NoActiveVersion("no active model version: start the server or a worker first")
        if heads.get(version) is not None:
            return _skipped(version, f"{version} already has an auxiliary head")
        self.progress({"phase": "sample", "head_for": version})
        window = split_window(self._records(), self.params)
        qm = self.deps.store.load(version, device=self.deps.device)
        samples = self.aux_samples(qm, version, window)
        if not samples:
            return _skipped(
                version,
                f"no samples of {version}'s default output: no such pool "
                "records, and no training prompts to sample (or explore_prompts=0)",
            )
        torch.manual_seed(self.params.seed)
        earlier = heads.latest()
        head = self.warm_head(qm, *(earlier or (None, None)))
        trainer = AuxTrainer(qm, frozen_copy(qm), head, self.config)
        self.aux_loop(trainer, samples)
        meta: dict[str, Any] = {
            "job_id": self.job_id,
            "base_version": version,
            "steps": trainer.step,
            "samples": len(samples),
            "satisfied": sum(s.satisfied for s in samples),
            "acft": self.config.to_dict(),
            **self.head_info,
        }
        with tempfile.TemporaryDirectory(prefix="aux-head-") as tmp:
            heads.publish(version, save_head(trainer.head, Path(tmp) / "head", meta), meta)
        return {"status": "published", "head_for": version, "seconds": time.time() - started,
                **{k: v for k, v in meta.items() if k != "acft"}}  # fmt: skip


def _skipped(version: str, reason: str) -> dict[str, Any]:
    return {"status": "skipped", "head_for": version, "reason": reason}
