"""notebooks/quickstart.ipynb runs top to bottom against a tiny checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from conftest import tiny_overrides
from nbclient import NotebookClient

import train
from ldm.config_utils import compose_config

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tiny_data: dict, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    train.run(compose_config("train", tiny_overrides(tiny_data, out, "trainer.max_steps=2")))
    monkeypatch.setenv("LDM_CKPT", str(out / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) == 2  # the sample grid and the trajectory
