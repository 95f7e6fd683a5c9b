"""Offline token counting with tiktoken, backed by the BPE files vendored in vendor/tiktoken."""

from __future__ import annotations

import hashlib
import os
import types
from collections.abc import Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import tiktoken
from langchain_core.messages import BaseMessage, convert_to_openai_messages

VENDOR_DIR: Path = Path(__file__).resolve().parent.parent / "vendor" / "tiktoken"
# Local model names (Ollama, vLLM, ...) are unknown to tiktoken; o200k is the modern OpenAI
# vocabulary, so it is the least-wrong estimate for them.
FALLBACK_ENCODING = "o200k_base"
# OpenAI chat format overhead (openai-cookbook "How to count tokens"): every message is wrapped
# in <|start|>{role}<|message|>...<|end|>, a `name` costs one more, and the reply is primed
# with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3


class TokenizerFilesError(RuntimeError):
    """The vendored tiktoken files are missing or corrupt (counting would need the network)."""


def configure_cache_dir() -> Path:
    """Point tiktoken at the vendored files unless the operator chose a TIKTOKEN_CACHE_DIR."""
    # An empty TIKTOKEN_CACHE_DIR tells tiktoken to download every time, which we never want,
    # so it counts as "not set".
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(VENDOR_DIR)
    return Path(os.environ["TIKTOKEN_CACHE_DIR"])


# At import, not lazily: langchain-openai and others call tiktoken directly, and they must find
# the vendored files too instead of reaching for the network.
configure_cache_dir()


@cache
def declared_blobs(encoding_name: str) -> tuple[tuple[str, str], ...]:
    """(blob_url, sha256) pairs that the installed tiktoken loads for `encoding_name`."""
    from tiktoken_ext import openai_public

    calls: list[tuple[str, str]] = []

    def record(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((blobpath, expected_hash or ""))
        return {}

    # Run a copy of tiktoken's own constructors with the loader swapped for a recorder: the
    # URLs and hashes then come from the installed tiktoken (no hard-coded copies to go stale),
    # and the real module stays untouched, so concurrent tiktoken users are unaffected.
    fake_globals: dict[str, Any] = dict(vars(openai_public))
    fake_globals["load_tiktoken_bpe"] = record
    for fn in openai_public.ENCODING_CONSTRUCTORS.values():
        fake_globals[fn.__name__] = types.FunctionType(fn.__code__, fake_globals, fn.__name__)
    constructor = openai_public.ENCODING_CONSTRUCTORS.get(encoding_name)
    if constructor is None:
        raise TokenizerFilesError(f"tiktoken has no encoding named {encoding_name!r}")
    fake_globals[constructor.__name__]()
    return tuple(calls)


def cache_path(cache_dir: Path, blob_url: str) -> Path:
    """Where tiktoken.load.read_file_cached looks for `blob_url` (sha1 of the URL)."""
    return cache_dir / hashlib.sha1(blob_url.encode()).hexdigest()


def verify_encoding_files(encoding_name: str) -> Path:
    """Check the files for `encoding_name` exist in the cache dir with the right sha256.

    tiktoken itself would silently delete a bad file and download it again; offline that
    becomes a confusing network error (and it would delete a vendored file), so we fail first.
    """
    cache_dir = configure_cache_dir()
    for blob_url, expected_sha256 in declared_blobs(encoding_name):
        path = cache_path(cache_dir, blob_url)
        if not path.is_file():
            raise TokenizerFilesError(
                f"tiktoken file for {encoding_name} is missing: {path.name} not found in "
                f"TIKTOKEN_CACHE_DIR={cache_dir} (expected {blob_url}); "
                f"run `python tools/build_tiktoken_files.py --out {cache_dir}`"
            )
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if expected_sha256 and actual != expected_sha256:
            raise TokenizerFilesError(
                f"tiktoken file for {encoding_name} is corrupt: {path} in TIKTOKEN_CACHE_DIR="
                f"{cache_dir} has sha256 {actual}, expected {expected_sha256}; "
                f"run `python tools/build_tiktoken_files.py --out {cache_dir}`"
            )
    return cache_dir


def encoding_name_for(model: str) -> str:
    """tiktoken encoding name for `model`, falling back to o200k_base for unknown names."""
    candidates = [model]
    # Router-style names ("openai/gpt-4o") are still OpenAI models underneath.
    if "/" in model:
        candidates.append(model.rsplit("/", 1)[1])
    for candidate in candidates:
        try:
            return tiktoken.encoding_name_for_model(candidate)
        except KeyError:
            continue
    return FALLBACK_ENCODING


@lru_cache(maxsize=128)
def encoding_for(model: str) -> tiktoken.Encoding:
    """Loaded tiktoken encoding for `model`; raises TokenizerFilesError rather than download."""
    name = encoding_name_for(model)
    verify_encoding_files(name)
    encoding = tiktoken.get_encoding(name)
    # The Rust tokenizer holds its own copy of the vocabulary; tiktoken keeps the Python dict it
    # was built from (200k bytes keys, ~27 MB for o200k_base) only to pickle the encoding
    # (tiktoken/core.py __getstate__), which counting never does.
    encoding._mergeable_ranks = {}
    return encoding


def count_tokens(text: str, model: str) -> int:
    """Number of tokens `text` costs for `model`."""
    # disallowed_special=(): user text may contain "<|endoftext|>"; count it as plain text
    # instead of raising, exactly as the API would treat it.
    return len(encoding_for(model).encode(text, disallowed_special=()))


def _content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            # Image/audio parts are priced by the API differently; not estimated here.
        return "".join(texts)
    return str(content)


def _count_message(message: Mapping[str, Any], encoding: tiktoken.Encoding) -> int:
    def n(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    total = TOKENS_PER_MESSAGE
    total += n(str(message.get("role", "")))
    total += n(_content_text(message.get("content")))
    if message.get("name"):
        total += n(str(message["name"])) + TOKENS_PER_NAME
    # Tool calls and results are part of the prompt too; an approximation (name + JSON args).
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        total += n(str(function.get("name", ""))) + n(str(function.get("arguments", "")))
    if message.get("tool_call_id"):
        total += n(str(message["tool_call_id"]))
    return total


def count_messages(
    messages: Sequence[BaseMessage] | Sequence[Mapping[str, Any]], model: str
) -> int:
    """Estimated prompt tokens of a chat request (OpenAI format: ~3 per message + 3)."""
    encoding = encoding_for(model)
    total = TOKENS_REPLY_PRIMING
    for message in messages:
        if isinstance(message, BaseMessage):
            # Reuse langchain's own conversion so roles/tool calls match what ChatOpenAI sends.
            message = convert_to_openai_messages(message)
        total += _count_message(message, encoding)
    return total


@lru_cache(maxsize=512)
def _count_repeated(text: str, model: str) -> int:
    return count_tokens(text, model)


def count_prompt(system: str, question: str, model: str) -> int:
    """count_messages of [system, user question], with the system prompt counted once per text:
    it is the same role, preferences and memories turn after turn."""
    overhead = TOKENS_REPLY_PRIMING + 2 * TOKENS_PER_MESSAGE
    roles = _count_repeated("system", model) + _count_repeated("user", model)
    return overhead + roles + _count_repeated(system, model) + count_tokens(question, model)
