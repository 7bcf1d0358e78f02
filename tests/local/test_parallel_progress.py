"""Rank 0's load reports its progress (/readyz, the terminal) like a single-process load."""

from __future__ import annotations

from pathlib import Path

import torch

from local_backend.load_progress import LoadProgress
from local_backend.parallel import SINGLE_PROCESS
from local_backend.parallel_serve import load_rank_model


def test_a_rank_load_reports_its_progress(tiny_hf_model_dir: Path) -> None:
    progress = LoadProgress(bar=False)
    load_rank_model(
        tiny_hf_model_dir, SINGLE_PROCESS, torch.device("cpu"), torch.float32, 64, 2,
        progress=progress,
    )  # fmt: skip
    assert progress.bytes_total > 0 and progress.bytes_done > 0
    assert progress.shards_done == progress.shards_total >= 1
