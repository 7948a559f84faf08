"""Shard URLs from anywhere: local paths, ``pipe:`` commands and ``scheme://`` URLs translated to commands.

    /data/train-{000000..000099}.tar            local files (brace ranges and comma lists expand)
    pipe:aws s3 cp s3://bucket/part-000001.tar -  any shell command that writes the tar to stdout
    s3://bucket/train-000001.tar                 -> ``aws s3 cp 's3://bucket/train-000001.tar' -``
    gs://bucket/train-000001.tar                 -> ``gsutil cat 'gs://bucket/train-000001.tar'``
    https://host/train-000001.tar                -> ``curl -fsSL ... 'https://host/train-000001.tar'``

The command per scheme is a template (``data.url_commands``) with the placeholders ``{url}``, ``{bucket}``
(the host) and ``{key}`` (the path after it), each shell-quoted. The shard index ``{prefix}.json`` of remote
shards is fetched from beside them through the same scheme (``pipe:`` commands: the shard name in the command
is replaced by the index name).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import braceexpand

from ldm.data.shards import read_index

log = logging.getLogger(__name__)

CURL = "curl -fsSL --retry 3 --retry-delay 1 --connect-timeout 30 {url}"
DEFAULT_COMMANDS: dict[str, str] = {
    "s3": "aws s3 cp {url} -",
    "gs": "gsutil cat {url}",
    "http": CURL,
    "https": CURL,
}
_SHARD_NAME = re.compile(r"(?P<prefix>[^\s'\"/]+)-\d+\.tar\b")


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def local_path(url: str) -> str:
    return url.removeprefix("file://")


def _split_top_level_commas(pattern: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_urls(pattern: str, require_all: bool = False) -> list[str]:
    """Expands braces (``part-{00000..00099}.tar``) and comma lists; local paths must exist.

    Missing local shards are dropped with a warning (training reads what is there), or, with ``require_all``,
    raise FileNotFoundError naming them (encoding: latent shard i is named after the i-th image shard).
    """
    urls = [u for part in _split_top_level_commas(pattern) for u in braceexpand.braceexpand(part)]
    local = [local_path(u) for u in urls if not is_remote(u)]
    existing = [u for u in local if Path(u).is_file()]
    if local and not existing:
        raise FileNotFoundError(
            f"No shard matches '{pattern}': check the path, or the brace range such as "
            f"data/train-{{000000..000003}}.tar"
        )
    if len(existing) < len(local):
        missing = [u for u in local if u not in set(existing)]
        if require_all:
            raise FileNotFoundError(
                f"{len(missing)} of {len(local)} shards in '{pattern}' do not exist ({', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}): latent shard i is numbered after image shard i, so "
                f"restore "
                "them or pass --shards listing only the shards that exist (into a fresh --out)"
            )
        log.warning(
            "%d of %d shards in '%s' do not exist; using the %d that do (first missing: %s)",
            len(missing),
            len(local),
            pattern,
            len(existing),
            missing[0],
        )
    keep = set(existing)
    return [u for u in urls if is_remote(u) or local_path(u) in keep]


def merged_commands(overrides: dict[str, str] | None) -> dict[str, str]:
    """The default command per scheme, updated with the configured ones."""
    commands = {**DEFAULT_COMMANDS, **(overrides or {})}
    for scheme, template in commands.items():
        if "{url}" not in template and "{key}" not in template:
            raise ValueError(
                f"url_commands.{scheme}='{template}' names no source: use {{url}} or {{bucket}}/{{key}}, "
                f"e.g. '+data.url_commands.{scheme}=\"aws s3 cp {{url}} -\"'"
            )
    return commands


def url_command(url: str, commands: dict[str, str]) -> str | None:
    """The shell command that writes ``url`` to stdout; None for a local file."""
    if url.startswith("pipe:"):
        return url.removeprefix("pipe:")
    if not is_remote(url):
        return None
    parts = urlsplit(url)
    template = commands.get(parts.scheme)
    if template is None:
        raise ValueError(
            f"No command reads '{parts.scheme}://' urls ({url}): add "
            f"'+data.url_commands.{parts.scheme}=\"<tool> {{url}}\"' (a command writing the file to stdout), "
            f"or use pipe:<command>"
        )
    fields = {"url": url, "bucket": parts.netloc, "key": parts.path.lstrip("/")}
    return template.format(**{k: shlex.quote(v) for k, v in fields.items()})


class ShardStream:
    """A readable byte stream of one shard: a local file or the stdout of a command (stderr kept for
    errors)."""

    def __init__(self, url: str, commands: dict[str, str], buffer_size: int = 1 << 20) -> None:
        self.url = url
        self.command = url_command(url, commands)
        self.proc: subprocess.Popen | None = None
        self.stderr: IO[bytes] | None = None
        if self.command is None:
            self.stream: IO[bytes] = open(local_path(url), "rb", buffering=buffer_size)  # noqa: SIM115
            return
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: a chatty tool cannot block
        self.proc = subprocess.Popen(  # its own process group: abort() stops the whole pipeline, not just sh
            self.command,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            bufsize=buffer_size,
            start_new_session=True,
        )
        self.stream = self.proc.stdout

    def read(self, n: int) -> bytes:
        return self.stream.read(n)

    def finish(self) -> str | None:
        """Closes after reading to the end; returns why the command failed, or None."""
        if self.proc is None:
            self.stream.close()
            return None
        while self.stream.read(1 << 16):  # the tar's end padding: a command cut off mid-write would fail
            pass
        self.stream.close()
        code = self.proc.wait()
        message = None
        if code != 0:
            self.stderr.seek(0)
            tail = self.stderr.read()[-300:].decode("utf-8", "replace").strip().replace("\n", " | ")
            message = f"'{self.command}' exited with {code}: {tail or 'no message'}"
        self.stderr.close()
        return message

    def abort(self) -> None:
        """Closes early (the reader stopped mid-shard): stops the command (sh and every process of its
        pipeline, e.g. ``curl ... | zstd -d``) without reporting its status."""
        if self.proc is not None:
            try:  # before reaping sh: its process group id cannot have been reused yet
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stream.close()
        if self.proc is not None:
            self.proc.wait()
            self.stderr.close()


def read_url(url: str, commands: dict[str, str]) -> bytes:
    """The whole content of a small file (an index) behind any url; OSError naming the command on failure."""
    if (command := url_command(url, commands)) is None:
        return Path(local_path(url)).read_bytes()
    done = subprocess.run(command, shell=True, capture_output=True, check=False)
    if done.returncode != 0:
        tail = done.stderr[-300:].decode("utf-8", "replace").strip().replace("\n", " | ")
        raise OSError(f"'{command}' exited with {done.returncode}: {tail or 'no message'}")
    return done.stdout


def shard_name(url: str) -> str:
    """``train-000003.tar`` for a path, a url (query dropped) or the last shard name in a ``pipe:``
    command."""
    if url.startswith("pipe:"):
        found = list(_SHARD_NAME.finditer(url))
        return found[-1].group(0) if found else url
    return Path(urlsplit(url).path if is_remote(url) else local_path(url)).name


def index_url_for(url: str) -> str | None:
    """``.../train-000003.tar`` -> ``.../train.json`` through the same scheme; None when the name has no
    prefix."""
    if url.startswith("pipe:"):
        found = list(_SHARD_NAME.finditer(url))
        if not found:
            return None
        last = found[-1]
        return f"{url[: last.start()]}{last['prefix']}.json{url[last.end() :]}"
    match = _SHARD_NAME.fullmatch(shard_name(url))
    if match is None:
        return None
    if not is_remote(url):
        return str(Path(local_path(url)).parent / f"{match['prefix']}.json")
    parts = urlsplit(url)
    path = parts.path[: len(parts.path) - len(match.group(0))] + f"{match['prefix']}.json"
    return parts._replace(path=path, query="", fragment="").geturl()


def load_index(url: str, commands: dict[str, str]) -> dict:
    """The shard index beside ``url`` (local or fetched); FileNotFoundError naming the fix when there is
    none."""
    index_url = index_url_for(url)
    if index_url is None:
        raise FileNotFoundError(f"'{url}' is not named PREFIX-NNNNNN.tar, so it has no shard index")
    if not is_remote(index_url):
        return read_index(index_url)
    try:
        index = json.loads(read_url(index_url, commands))
    except (OSError, ValueError) as exn:
        raise FileNotFoundError(f"could not read the shard index {index_url} ({exn})") from None
    if not isinstance(index, dict) or {"shards", "counts"} - set(index):
        raise ValueError(f"Shard index {index_url} lacks 'shards'/'counts': rewrite it with write_shards")
    index.setdefault("meta", {})
    return index


def count_samples(urls: list[str], commands: dict[str, str], arg_name: str) -> tuple[int, dict]:
    """Sums the index counts of the selected shards; returns (samples, index meta). Errors name
    ``arg_name``."""
    try:
        index = load_index(urls[0], commands)
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"{exn}: pass {arg_name}=<number of samples>") from None
    counts = dict(zip(index["shards"], index["counts"], strict=True))
    missing = [u for u in urls if shard_name(u) not in counts]
    if missing:
        raise ValueError(
            f"Shards {missing[:3]} are not in the index beside them: pass {arg_name}=<number of samples>"
        )
    return sum(counts[shard_name(u)] for u in urls), index["meta"]
