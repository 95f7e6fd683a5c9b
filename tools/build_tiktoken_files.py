"""Build tiktoken's o200k_base/cl100k_base files offline from the npm `tiktoken` package.

tiktoken downloads its BPE files from openaipublic.blob.core.windows.net on first use; the bot
must count tokens with no network, so we vendor the files. PyPI has no wheel that bundles them,
but the npm package `tiktoken` ships the same ranks in a compressed JSON form. Expanding that
form reproduces the official `.tiktoken` files byte for byte, which we prove by checking the
sha256 that the installed Python tiktoken itself expects.

Usage:
    python tools/build_tiktoken_files.py                  # runs `npm pack tiktoken@1.0.22`
    python tools/build_tiktoken_files.py --tarball X.tgz  # uses an already-downloaded tarball
    python tools/build_tiktoken_files.py --out DIR        # default: <repo>/vendor/tiktoken
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

NPM_SPEC = "tiktoken@1.0.22"
ENCODINGS = ("o200k_base", "cl100k_base")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "vendor" / "tiktoken"


def declared_blobs(encoding_name: str) -> list[tuple[str, str]]:
    """Return [(blob_url, expected_sha256)] that tiktoken's constructor for `encoding_name` loads.

    We call a copy of the real constructor whose globals have `load_tiktoken_bpe` replaced by a
    recorder, so the URL and hash come from the installed tiktoken (nothing hard-coded here),
    nothing is downloaded, and the real module is never patched.
    """
    from tiktoken_ext import openai_public

    calls: list[tuple[str, str]] = []

    def record(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash is None:
            raise RuntimeError(f"tiktoken declares no hash for {blobpath}; refusing to vendor it")
        calls.append((blobpath, expected_hash))
        return {}

    fake_globals: dict[str, Any] = dict(vars(openai_public))
    fake_globals["load_tiktoken_bpe"] = record
    # Rebind every constructor to the fake globals too, so one calling another (o200k_harmony
    # calls o200k_base) also hits the recorder instead of the network.
    for fn in openai_public.ENCODING_CONSTRUCTORS.values():
        fake_globals[fn.__name__] = types.FunctionType(fn.__code__, fake_globals, fn.__name__)
    constructor = fake_globals[openai_public.ENCODING_CONSTRUCTORS[encoding_name].__name__]
    constructor()
    if not calls:
        raise RuntimeError(f"tiktoken's {encoding_name} constructor loads no .tiktoken file")
    return calls


def cache_name(blob_url: str) -> str:
    """File name tiktoken.load.read_file_cached looks for inside TIKTOKEN_CACHE_DIR."""
    return hashlib.sha1(blob_url.encode()).hexdigest()


def expand_bpe_ranks(compressed: str) -> bytes:
    """Expand npm tiktoken's `bpe_ranks` ("<x> <offset> <b64> <b64> ..." per line, ranks
    consecutive from offset) into the official "<b64> <rank>\\n" format, sorted by rank."""
    ranks: dict[str, int] = {}
    for line in compressed.split("\n"):
        if not line:
            continue
        _, offset_str, *tokens = line.split(" ")
        offset = int(offset_str)
        for i, token in enumerate(tokens):
            ranks[token] = offset + i
    # Validate the tokens are real base64 so a format change fails loudly here, not at runtime.
    for token in list(ranks)[:1000]:
        base64.b64decode(token, validate=True)
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(f"{token} {rank}\n".encode() for token, rank in ordered)


def npm_pack(workdir: Path) -> Path:
    """Download the npm tarball into `workdir` with the ordinary npm client."""
    result = subprocess.run(
        ["npm", "pack", NPM_SPEC, "--silent"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    )
    name = result.stdout.strip().splitlines()[-1]
    return workdir / name


def read_encoder_json(tarball: Path, encoding_name: str) -> dict[str, Any]:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(f"package/encoders/{encoding_name}.json")
        if member is None:
            raise RuntimeError(f"{tarball} has no package/encoders/{encoding_name}.json")
        data: dict[str, Any] = json.load(member)
    return data


def build(tarball: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for encoding_name in ENCODINGS:
        blobs = declared_blobs(encoding_name)
        if len(blobs) != 1:
            raise RuntimeError(f"{encoding_name}: expected one .tiktoken file, got {blobs}")
        blob_url, expected_sha256 = blobs[0]
        content = expand_bpe_ranks(read_encoder_json(tarball, encoding_name)["bpe_ranks"])
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected_sha256:
            raise RuntimeError(
                f"{encoding_name}: expanded file sha256 {actual} != {expected_sha256} that "
                f"tiktoken declares for {blob_url}; the npm package format may have changed"
            )
        target = out_dir / cache_name(blob_url)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.replace(target)  # atomic, so a concurrent reader never sees half a file
        written.append(target)
        print(f"{encoding_name}: {target} ({len(content)} bytes, sha256 {actual}, from {blob_url})")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help=f"already-downloaded {NPM_SPEC} .tgz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    if args.tarball:
        build(args.tarball, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(npm_pack(Path(tmp)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
