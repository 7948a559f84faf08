"""Shards from anywhere: http(s) over a real loopback server, ``pipe:`` commands and s3/gs urls as commands.

Each remote source must give exactly the batches the local paths give (keys, captions, latents, embeddings),
with the sample count and metadata read from the index fetched through the same scheme.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data import ShardDataModule, ShardDataset
from ldm.data.urls import DEFAULT_COMMANDS, index_url_for, shard_name, url_command

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) shards are read with curl")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) serving an empty folder the test fills."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _shard_names(tiny_data: dict) -> list[str]:
    names = sorted(p.name for p in Path(tiny_data["latents"]).glob("train-*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    return names


def _batches(dm: ShardDataModule) -> list[dict]:
    dm.setup("fit")
    return list(dm.train_dataloader()) + list(dm.val_dataloader())


def _assert_same_batches(remote: list[dict], local: list[dict]) -> None:
    assert len(remote) == len(local) > 0
    for r, loc in zip(remote, local, strict=True):
        assert set(r) == set(loc)
        for key, value in loc.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(r[key], value), key
            elif key != "skipped_shards":  # named by url, which differs
                assert r[key] == value, key


def _local(tiny_data: dict, **kwargs: object) -> ShardDataModule:
    latents = tiny_data["latents"]
    kwargs = {"batch_size": 16, "shuffle_buffer": 8, **kwargs}
    val = f"{latents}/val-000000.tar" if kwargs["batch_size"] == 16 else None
    return ShardDataModule(f"{latents}/train-{{000000..000002}}.tar", val, **kwargs)


@needs_curl
def test_http_shards_equal_local_shards(tiny_data: dict, http_root: tuple[str, Path]) -> None:
    base, root = http_root
    for path in Path(tiny_data["latents"]).iterdir():
        shutil.copy(path, root / path.name)
    names = _shard_names(tiny_data)
    remote = ShardDataModule(
        f"{base}/train-{{000000..000002}}.tar", f"{base}/val-000000.tar", batch_size=16, shuffle_buffer=8
    )
    local = _local(tiny_data)
    assert remote.train_urls == [f"{base}/{n}" for n in names]
    assert (remote.train_samples, remote.val_samples) == (local.train_samples, local.val_samples)
    assert remote.index_meta == local.index_meta and remote.latent_shape == (4, 8, 8)
    remote_batches = _batches(remote)
    _assert_same_batches(remote_batches, _batches(local))
    assert "context" in remote_batches[0] and all(b["skipped"] == {} for b in remote_batches)


@needs_curl
def test_http_missing_shard_is_counted_and_the_rest_is_read(
    tiny_data: dict, http_root: tuple[str, Path]
) -> None:
    base, root = http_root
    shutil.copy(Path(tiny_data["latents"]) / "train-000000.tar", root)
    urls = [f"{base}/train-000000.tar", f"{base}/train-000009.tar"]  # the second one is a 404
    ds = ShardDataset(urls, "latents", batch_size=40, num_batches=1, shuffle=False, latent_shape=(4, 8, 8))
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert len(batch["__key__"]) == 40
    # the missing shard is read after the 40th sample: the next batch would carry it; read one more pass
    ds = ShardDataset(
        urls[::-1], "latents", batch_size=40, num_batches=1, shuffle=False, latent_shape=(4, 8, 8)
    )
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert batch["skipped"] == {"read_error": 1}
    assert batch["skipped_shards"] == {urls[1]: {"read_error": 1}}
    with pytest.raises(FileNotFoundError, match=r"could not read the shard index .*train_samples=<number"):
        ShardDataModule(f"{base}/other-000000.tar")


def test_pipe_shards_equal_local_shards(tiny_data: dict) -> None:
    latents = shlex.quote(str(tiny_data["latents"]))
    remote = ShardDataModule(
        f"pipe:cat {latents}/train-{{000000..000002}}.tar",
        f"pipe:cat {latents}/val-000000.tar",
        batch_size=16,
        shuffle_buffer=8,
    )
    assert remote.train_samples == _local(tiny_data).train_samples and remote.latent_shape == (4, 8, 8)
    _assert_same_batches(_batches(remote), _batches(_local(tiny_data)))


def test_pipe_shards_with_two_workers(tiny_data: dict) -> None:
    latents = shlex.quote(str(tiny_data["latents"]))
    remote = ShardDataModule(
        f"pipe:cat {latents}/train-{{000000..000002}}.tar", batch_size=10, shuffle_buffer=8, num_workers=2
    )
    _assert_same_batches(_batches(remote), _batches(_local(tiny_data, num_workers=2, batch_size=10)))


def test_s3_urls_run_through_their_command_template(tiny_data: dict) -> None:
    """``s3://`` becomes a command; here the template is ``cat`` of the local copy, so no aws CLI is
    needed."""
    command = f"cat {shlex.quote(str(tiny_data['latents']))}/{{key}}"
    remote = ShardDataModule(
        "s3://tiny-bucket/train-{000000..000002}.tar",
        "s3://tiny-bucket/val-000000.tar",
        batch_size=16,
        shuffle_buffer=8,
        url_commands={"s3": command},
    )
    assert remote.train_samples == _local(tiny_data).train_samples and remote.index_meta["latent_shape"] == [
        4,
        8,
        8,
    ]
    _assert_same_batches(_batches(remote), _batches(_local(tiny_data)))
    wrong = {"s3": "cat /nowhere/{key}"}
    with pytest.raises(
        FileNotFoundError, match=r"s3://tiny-bucket/train\.json .*exited with 1.*train_samples="
    ):
        ShardDataModule("s3://tiny-bucket/train-000000.tar", url_commands=wrong)


def test_url_translation() -> None:
    assert (
        url_command("s3://b/dir/train-000001.tar", DEFAULT_COMMANDS)
        == "aws s3 cp s3://b/dir/train-000001.tar -"
    )
    assert url_command("gs://b/train-000001.tar", DEFAULT_COMMANDS) == "gsutil cat gs://b/train-000001.tar"
    assert url_command("https://h/a b.tar", DEFAULT_COMMANDS).endswith("'https://h/a b.tar'")  # shell-quoted
    assert url_command("pipe:cat x.tar", DEFAULT_COMMANDS) == "cat x.tar"
    assert url_command("/data/train-000001.tar", DEFAULT_COMMANDS) is None
    with pytest.raises(ValueError, match=r"""add '\+data\.url_commands\.ftp="<tool> \{url\}"'"""):
        url_command("ftp://h/train-000001.tar", DEFAULT_COMMANDS)
    assert index_url_for("https://h/d/train-000003.tar?sig=1") == "https://h/d/train.json"
    assert index_url_for("pipe:aws s3 cp s3://b/part-000001.tar -") == "pipe:aws s3 cp s3://b/part.json -"
    assert index_url_for("/d/00001.tar") is None
    assert shard_name("pipe:curl -s https://h/d/train-000003.tar | cat") == "train-000003.tar"
    with pytest.raises(
        ValueError, match=r"""names no source: .*'\+data\.url_commands\.s3="aws s3 cp \{url\} -"'"""
    ):
        ShardDataModule("pipe:cat x-000000.tar", train_samples=1, url_commands={"s3": "aws s3 cp -"})


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a parent that is not this test to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_abort_stops_the_whole_pipeline(tmp_path: Path) -> None:
    """abort() of a command such as ``curl ... | zstd -d`` stops every process of it, not only the shell."""
    import time

    from ldm.data.urls import ShardStream

    pid_file = tmp_path / "pid"
    stream = ShardStream(f"pipe:sh -c 'echo $$ > {pid_file}; exec sleep 60' | cat", DEFAULT_COMMANDS)
    deadline = time.monotonic() + 10
    while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert not _gone(child)
    stream.abort()
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(child), "the pipeline's sleep outlived abort()"
