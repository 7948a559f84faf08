"""sample.py: bad arguments, prompts files, checkpoint files and a full disk end in one line that names the
fix."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides

import sample
import train
from ldm.config_utils import compose_config


@pytest.fixture(scope="module")
def good_ckpt(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    train.run(compose_config("train", tiny_overrides(tiny_data, out, "trainer.max_steps=2")))
    return out / "checkpoints" / "last.ckpt"


def sample_cfg(ckpt: Path | str, out_dir: Path, *extra: str):
    return compose_config(
        "sample",
        [f"ckpt={ckpt}", f"out_dir={out_dir}", "prompt=red apple", "num_images=2", "steps=2", *extra],
    )


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# ---- arguments: refused before the checkpoint is read (ckpt need not exist) --------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_images=0", r"num_images=0 must be a whole number >= 1"),
        ("num_images=-3", r"num_images=-3 must be a whole number >= 1"),
        ("batch_size=0", r"batch_size=0 must be a whole number >= 1"),
        ("steps=0", r"steps=0 must be a whole number >= 1"),
        (
            "guidance_interval=[1.0]",
            r"guidance_interval=\[1.0\] is not two numbers: pass guidance_interval=\[lo,hi\]",
        ),
        ("guidance_interval=[1,2,3]", r"is not two numbers"),
        ("guidance_interval=[a,b]", r"guidance_interval=\['a', 'b'\] is not two numbers"),
        ("guidance_interval=0.5", r"guidance_interval=0.5 is not two numbers"),
        ("guidance_interval=[5.0,1.0]", r"guidance_interval=\[5.0, 1.0\] needs 0 <= lo < hi"),
        ("guidance_interval=[-1.0,2.0]", r"guidance_interval=\[-1.0, 2.0\] needs 0 <= lo < hi"),
    ],
)
def test_bad_arguments(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message) as err:
        sample.run(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "o", override))
    one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(ValueError, match=r"'.*taken' is a file — pass another out_dir"):
        sample.run(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "taken"))
    with pytest.raises(ValueError, match=r"'.*taken' is a file — pass another out_dir"):
        sample.run(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "taken" / "sub"))
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_prompts_file_with_only_blank_lines(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n\t\n")
    with pytest.raises(ValueError, match=r"prompts_file '.*prompts.txt' has no prompts \(only blank lines\)"):
        sample.run(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "o", f"prompts_file={prompts}"))


def test_prompts_file_not_utf8_is_refused_with_the_fix(tmp_path: Path) -> None:
    """Refused, not guessed: a mis-decoded prompt would condition the model on other text without any sign."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("red apple\ncafé crème\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"is not UTF-8 \(byte 0xe9 at offset 13\): re-save it as UTF-8, e\.g\. iconv"
    ):
        sample.run(sample_cfg(tmp_path / "missing.ckpt", tmp_path / "o", f"prompts_file={prompts}"))


def test_prompts_file_utf8_with_bom(good_ckpt: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffcafé crème\n".encode())
    records = sample.run(sample_cfg(good_ckpt, tmp_path / "o", f"prompts_file={prompts}", "num_images=1"))
    assert [r["prompt"] for r in records] == ["café crème"]


# ---- checkpoint files --------------------------------------------------------------------------------------


def bad_files(good: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    files = {
        "empty": (b"", r"checkpoint '.*empty.ckpt' is empty \(0 bytes"),
        "truncated": (
            data[: len(data) // 2],
            r"cannot read checkpoint '.*truncated.ckpt' \(RuntimeError: .*truncated",
        ),
        "text": (
            b"model: unet\nsteps: 10\n",
            r"cannot read checkpoint '.*text.ckpt' \(.*: it is truncated, corrupt",
        ),
        "random": (
            random.Random(0).randbytes(4096),
            r"cannot read checkpoint '.*random.ckpt' \(\w+: .*not a torch file",
        ),
    }
    out = {}
    for name, (content, message) in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
        out[name] = (tmp_path / f"{name}.ckpt", message)
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    out["tensor"] = (tmp_path / "tensor.ckpt", r"holds a Tensor, not a checkpoint dict: pass ckpt=PATH")
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "foreign.ckpt")
    out["foreign"] = (tmp_path / "foreign.ckpt", r"is not a latent-diffusion checkpoint written by train.py")
    return out


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "random", "tensor", "foreign"])
def test_unusable_checkpoint_file(kind: str, good_ckpt: Path, tmp_path: Path) -> None:
    path, message = bad_files(good_ckpt, tmp_path)[kind]
    with pytest.raises(ValueError, match=message) as err:
        sample.run(sample_cfg(path, tmp_path / "o"))
    assert "pass ckpt=PATH" in one_line_error(err)


def nan_checkpoint(good: Path, tmp_path: Path, ema: bool, fraction_one: bool = False) -> tuple[Path, str]:
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    weights = ckpt["ema_state_dict"] if ema else ckpt["state_dict"]
    prefix = "" if ema else "denoiser.net."
    name = next(
        k for k, v in weights.items() if k.startswith(prefix) and v.is_floating_point() and v.numel() > 100
    )
    if fraction_one:
        weights[name].view(-1)[0] = float("inf")
    else:
        weights[name].fill_(float("nan"))
    path = tmp_path / "diverged.ckpt"
    torch.save(ckpt, path)
    return path, name


def test_non_finite_ema_weights(good_ckpt: Path, tmp_path: Path) -> None:
    path, name = nan_checkpoint(good_ckpt, tmp_path, ema=True)
    with pytest.raises(ValueError) as err:
        sample.run(sample_cfg(path, tmp_path / "o"))
    text = one_line_error(err)
    assert f"checkpoint '{path}' has non-finite weights" in text and f"first in EMA '{name}'" in text
    assert "the run diverged: resume from an earlier checkpoint or lower the learning rate" in text
    assert "only the EMA weights are bad: pass use_ema=false" in text
    assert not (tmp_path / "o").exists()
    # the raw weights are fine: use_ema=false samples
    assert len(sample.run(sample_cfg(path, tmp_path / "raw", "use_ema=false"))) == 2


def test_non_finite_raw_weights_name_the_fraction(good_ckpt: Path, tmp_path: Path) -> None:
    path, name = nan_checkpoint(good_ckpt, tmp_path, ema=False, fraction_one=True)
    total = sum(
        v.numel()
        for k, v in torch.load(good_ckpt, weights_only=True)["state_dict"].items()
        if k.startswith("denoiser.net.") and v.is_floating_point()
    )
    with pytest.raises(ValueError) as err:
        sample.run(sample_cfg(path, tmp_path / "o", "use_ema=false"))
    text = one_line_error(err)
    assert (
        f"{100 / total:.3g}% of {total} values are NaN/Inf, first in net "
        f"'{name.removeprefix('denoiser.net.')}'" in text
    )
    assert "use_ema=false" not in text


# ---- writing the images ------------------------------------------------------------------------------------


def test_disk_full_while_saving_a_png(
    good_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    def full_disk(self: Image.Image, fp: Path, *args, **kwargs) -> None:
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(
        OSError,
        match=r"could not write '.*0000_red-apple_seed0.png': No space left on device \(ENOSPC\) — the disk "
        r"is full",
    ) as err:
        sample.run(sample_cfg(good_ckpt, tmp_path / "o"))
    assert err.value.errno == errno.ENOSPC
    one_line_error(err)
    assert list((tmp_path / "o").iterdir()) == []  # the partial PNG is removed


def test_disk_full_while_writing_metadata(
    good_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: Path, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(
        OSError, match=r"could not write '.*metadata.json': No space left on device \(ENOSPC\)"
    ):
        sample.run(sample_cfg(good_ckpt, tmp_path / "o"))


EFBIG_DRIVER = """
import resource, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
from ldm.config_utils import compose_config
import sample
cfg = compose_config("sample", {overrides!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of the process being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # bytes; a 32x32 PNG is larger
try:
    sample.run(cfg)
except OSError as err:
    print("RAISED", type(err).__name__, err.errno, str(err))
"""


def test_file_size_limit_while_saving(good_ckpt: Path, tmp_path: Path) -> None:
    """A real EFBIG from the kernel (RLIMIT_FSIZE) in a child process: the cause is in the one-line
    message."""
    overrides = [
        f"ckpt={good_ckpt}",
        f"out_dir={tmp_path / 'o'}",
        "prompt=red apple",
        "num_images=1",
        "steps=2",
    ]
    driver = EFBIG_DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests"), overrides=overrides)
    out = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RAISED")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    assert lines[0].startswith(f"RAISED OSError {errno.EFBIG} ")
    assert "File too large (EFBIG) — the file-size limit is too small: raise it (ulimit -f)" in lines[0]
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix == ".png"]


# ---- the command line --------------------------------------------------------------------------------------


def test_cli_bad_checkpoint_is_one_line_on_stderr_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"ckpt={tmp_path / 'empty.ckpt'}",
            "prompt=x",
            f"out_dir={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if "is empty (0 bytes" in line]
    assert len(errors) == 1 and "CheckpointError: checkpoint '" in errors[0] and "pass ckpt=PATH" in errors[0]
    assert "is empty" not in out.stdout
