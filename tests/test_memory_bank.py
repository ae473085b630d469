"""MemoryBank directories read lazily: opening one reads each memory's header and embedding, not
its keys and values; those are read from the memory's file when first used (bit-exact), kept
in a bounded cache, and a replaced or removed memory is never served from it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from grc_jax.inference import BankSpec, MemoryBank
from grc_jax.inference import memory_bank as mb

SPEC = BankSpec(num_layers=2, num_latents=4, num_kv_heads=2, head_dim=8, embed_dim=32, dtype="bfloat16")
MEMORY_BYTES = 2 * 2 * 4 * 2 * 8 * 2  # keys and values of one memory, bfloat16


def _memories(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kv = lambda: rng.normal(size=(n, 2, 4, 2, 8)).astype(ml_dtypes.bfloat16)
    return kv(), kv(), rng.normal(size=(n, 32)).astype(np.float32)


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The memory ids whose keys and values were read from their files, in order."""
    seen: list[int] = []
    real = mb._read_kv

    def counting(file, spec, version):
        seen.append(int(file.stem))
        return real(file, spec, version)

    monkeypatch.setattr(mb, "_read_kv", counting)
    return seen


def test_opening_a_bank_reads_no_keys_or_values_and_a_used_memory_reads_its_own_bit_exact(tmp_path, reads):
    keys, values, embeddings = _memories(6)
    MemoryBank.open(tmp_path / "bank", SPEC).add(keys, values, embeddings, texts=[f"m{i}" for i in range(6)])
    assert reads == []  # an add keeps what it wrote: nothing is read back

    bank = MemoryBank.open(tmp_path / "bank", SPEC)
    # listing, texts, embeddings and search work without reading any keys or values
    assert bank.ids == list(range(6)) and bank.get(4).text == "m4"
    np.testing.assert_array_equal(bank.embeddings()[1], embeddings)
    ids, _ = bank.search(embeddings[[3]], top_k=2)
    assert ids[0, 0] == 3
    assert reads == []

    k, v = bank.kv([3, 1])
    assert reads == [3, 1]
    assert k.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k.view(np.uint16), keys[[3, 1]].view(np.uint16))
    np.testing.assert_array_equal(v.view(np.uint16), values[[3, 1]].view(np.uint16))
    np.testing.assert_array_equal(bank.get(1).values.view(np.uint16), values[1].view(np.uint16))
    assert reads == [3, 1]  # the cache serves them again


def test_the_cache_is_bounded_and_never_serves_a_replaced_or_removed_memory(tmp_path, reads):
    keys, values, embeddings = _memories(4)
    MemoryBank.open(tmp_path / "bank", SPEC).add(keys, values, embeddings)
    bank = MemoryBank.open(tmp_path / "bank", SPEC, kv_cache_bytes=2 * MEMORY_BYTES)
    for i in (0, 1, 2, 0):  # two fit: reading 2 dropped 0, the least recently used
        bank.kv([i])
    assert reads == [0, 1, 2, 0]

    k2, v2, e2 = _memories(1, seed=1)
    bank.replace(1, k2[0], v2[0], e2[0], "new")
    np.testing.assert_array_equal(bank.kv([1])[1][0].view(np.uint16), v2[0].view(np.uint16))
    again = MemoryBank.open(tmp_path / "bank", SPEC)
    np.testing.assert_array_equal(again.kv([1])[0][0].view(np.uint16), k2[0].view(np.uint16))
    assert again.get(1).version == 1 and again.get(1).text == "new"

    bank.remove([2])
    with pytest.raises(KeyError, match=r"\[2\]"):
        bank.kv([2])


def test_a_memory_file_changed_behind_the_banks_back_is_a_clear_error(tmp_path):
    keys, values, embeddings = _memories(2)
    MemoryBank.open(tmp_path / "bank", SPEC).add(keys, values, embeddings)
    bank = MemoryBank.open(tmp_path / "bank", SPEC)
    file = tmp_path / "bank" / "memories" / "000000000001.safetensors"
    file.unlink()
    with pytest.raises(ValueError, match="000000000001.safetensors"):
        bank.kv([1])
    # another process's replace: the file holds a newer version than the bank knows
    other = MemoryBank.open(tmp_path / "bank", SPEC)
    other.replace(0, keys[1], values[1], embeddings[1])
    with pytest.raises(ValueError, match="holds version 1 of the memory, the bank expects 0"):
        bank.kv([0])


def test_a_bad_header_is_named_at_open(tmp_path):
    keys, values, embeddings = _memories(1)
    MemoryBank.open(tmp_path / "bank", SPEC).add(keys, values, embeddings)
    wrong = BankSpec(num_layers=2, num_latents=4, num_kv_heads=2, head_dim=8, embed_dim=32, dtype="float32")
    index = tmp_path / "bank" / "bank.json"
    index.write_text(index.read_text().replace('"bfloat16"', '"float32"'))
    with pytest.raises(ValueError, match=r"000000000000.safetensors: tensor 'keys' is BF16 .* says F32"):
        MemoryBank.open(tmp_path / "bank", wrong)


def test_an_npz_bank_and_a_converted_directory_give_the_same_memories(tmp_path, reads):
    keys, values, embeddings = _memories(3)
    bank = MemoryBank(SPEC)
    bank.add(keys, values, embeddings, texts=["a", "b", "c"])
    old = MemoryBank.load(bank.save(tmp_path / "old.npz"))
    old.save_to_directory(tmp_path / "dir")
    reopened = MemoryBank.open(tmp_path / "dir", SPEC)
    assert reads == []
    for i in range(3):
        np.testing.assert_array_equal(reopened.get(i).keys.view(np.uint16), keys[i].view(np.uint16))
        assert reopened.get(i).text == "abc"[i]
