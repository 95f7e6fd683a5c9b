"""Offline token counting: vendored tiktoken files, no network, corrupt files rejected."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken.registry
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from graph import tokens
from graph.tokens import (
    VENDOR_DIR,
    TokenizerFilesError,
    count_messages,
    count_tokens,
    encoding_for,
)

MULTILINGUAL = "Привет, мир! こんにちは世界 🌍 Grüße, naïve café — 你好"
# Computed once with the vendored files, and cross-checked with the independent JS/wasm
# implementation shipped in npm tiktoken@1.0.22 (`get_encoding(n).encode(s).length`).
MULTILINGUAL_TOKENS = {"o200k_base": 18, "cl100k_base": 25}
O200K_FILE = "fb374d419588a4632f3f557e76b4b70aebbca790"
CL100K_FILE = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
# From the research note (shared/research §5), to cross-check what tiktoken declares.
NOTE_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


class NetworkBlocked(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fresh_tiktoken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget every loaded encoding so the files are really read again from the cache dir."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    encoding_for.cache_clear()
    yield
    encoding_for.cache_clear()


def use_cache_dir(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(path))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)


def test_vendored_files_exist_under_tiktoken_cache_names() -> None:
    for name in ("o200k_base", "cl100k_base"):
        ((url, sha256),) = tokens.declared_blobs(name)
        path = tokens.cache_path(VENDOR_DIR, url)
        assert path.name == hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert {p.name for p in VENDOR_DIR.iterdir()} >= {O200K_FILE, CL100K_FILE}


def test_counts_offline_with_vendored_dir(
    monkeypatch: pytest.MonkeyPatch, no_network: None, fresh_tiktoken: None
) -> None:
    use_cache_dir(monkeypatch, VENDOR_DIR)
    assert count_tokens("hello world", "gpt-4o") == 2
    for model, encoding_name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        encoding = encoding_for(model)
        assert encoding.name == encoding_name
        ids = encoding.encode(MULTILINGUAL)
        assert len(ids) == MULTILINGUAL_TOKENS[encoding_name]
        assert count_tokens(MULTILINGUAL, model) == MULTILINGUAL_TOKENS[encoding_name]
        assert encoding.decode(ids) == MULTILINGUAL


def test_model_mapping_and_fallback(no_network: None) -> None:
    assert tokens.encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert tokens.encoding_name_for("gpt-5-mini") == "o200k_base"
    assert tokens.encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert tokens.encoding_name_for("text-embedding-3-small") == "cl100k_base"
    assert tokens.encoding_name_for("openai/gpt-4") == "cl100k_base"
    # Local model names are unknown to tiktoken: o200k, not an error.
    assert tokens.encoding_name_for("llama3.1:8b") == "o200k_base"
    assert count_tokens(MULTILINGUAL, "qwen2.5:7b") == MULTILINGUAL_TOKENS["o200k_base"]


def test_special_token_text_is_counted_not_rejected(no_network: None) -> None:
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1


def test_count_messages_matches_langchain_openai(no_network: None) -> None:
    from langchain_openai import ChatOpenAI

    messages = [
        SystemMessage("You are a helpful bot."),
        HumanMessage("Привет! How are you?"),
        AIMessage("Fine, thanks."),
        HumanMessage("tell me a joke", name="bob"),
    ]
    for model in ("gpt-4o", "gpt-4"):
        expected = ChatOpenAI(model=model, api_key="sk-test").get_num_tokens_from_messages(messages)
        assert count_messages(messages, model) == expected
    as_dicts = [
        {"role": "system", "content": "You are a helpful bot."},
        {"role": "user", "content": "Привет! How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "tell me a joke", "name": "bob"},
    ]
    assert count_messages(as_dicts, "gpt-4o") == count_messages(messages, "gpt-4o")
    # 3 reply-priming + per message: 3 + role + content.
    assert count_messages([{"role": "user", "content": "hello world"}], "gpt-4o") == 3 + 3 + 1 + 2


def test_corrupted_file_is_rejected_with_the_dir_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None, fresh_tiktoken: None
) -> None:
    shutil.copy(VENDOR_DIR / O200K_FILE, tmp_path / O200K_FILE)
    shutil.copy(VENDOR_DIR / CL100K_FILE, tmp_path / CL100K_FILE)
    corrupt = tmp_path / O200K_FILE
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    use_cache_dir(monkeypatch, tmp_path)

    with pytest.raises(TokenizerFilesError, match="corrupt") as excinfo:
        count_tokens("hello world", "gpt-4o")
    assert str(tmp_path) in str(excinfo.value)
    # tiktoken on its own would have deleted the file and tried to download it.
    assert corrupt.exists()
    # The intact encoding in the same dir still works.
    assert count_tokens("hello world", "gpt-4") == 2


def test_missing_files_are_reported_not_downloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None, fresh_tiktoken: None
) -> None:
    use_cache_dir(monkeypatch, tmp_path)
    with pytest.raises(TokenizerFilesError, match="missing") as excinfo:
        encoding_for("gpt-4o")
    assert str(tmp_path) in str(excinfo.value)


def test_operator_cache_dir_is_respected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tokens.configure_cache_dir() == tmp_path
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert tokens.configure_cache_dir() == VENDOR_DIR
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" would make tiktoken download every time
    assert tokens.configure_cache_dir() == VENDOR_DIR


def _load_build_script() -> Any:
    path = Path(__file__).resolve().parent.parent / "tools" / "build_tiktoken_files.py"
    spec = importlib.util.spec_from_file_location("build_tiktoken_files", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_expansion_and_declared_hashes(no_network: None) -> None:
    build = _load_build_script()
    assert build.expand_bpe_ranks("! 0 IQ== Ig==\n! 5 Iw==\n") == b"IQ== 0\nIg== 1\nIw== 5\n"
    for name in ("o200k_base", "cl100k_base"):
        # Both readers of tiktoken's constructors agree, and the research note's values match.
        assert tuple(build.declared_blobs(name)) == tokens.declared_blobs(name)
        ((url, sha256),) = build.declared_blobs(name)
        assert sha256 == NOTE_SHA256[name]
        assert build.cache_name(url) == {"o200k_base": O200K_FILE, "cl100k_base": CL100K_FILE}[name]


def test_count_prompt_is_count_messages_of_system_and_question(no_network: None) -> None:
    from graph.tokens import count_prompt

    system = "You are a careful coder.\n\n## The user's preferences\nShort answers, in Russian."
    for model in ("gpt-4o", "gpt-4"):
        for question in ("hi", "Привет! Как развернуть словарь? " * 20):
            expected = count_messages([SystemMessage(system), HumanMessage(question)], model)
            assert count_prompt(system, question, model) == expected
