"""pie.engine.gguf_file and gguf_tensors against gguf-py (the reference reader and dequantizers)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from pie.engine.errors import ModelLoadError
from pie.engine.gguf_file import read_gguf
from pie.engine.gguf_tensors import dequantize
from pie.engine.loader import default_model_path

BLOCK_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return array.view(np.uint32)


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, Q.F16, Q.BF16, Q.F32])
def test_dequantize_is_bit_identical_to_gguf_py(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((3, 8, 256)) * rng.uniform(0.01, 10.0)).astype(np.float32)
    values[0, 0, :32] = 0.0  # an all-zero block (scale 0)
    data = quants.quantize(values, qtype)
    got = dequantize(data, qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == values.shape
    assert np.array_equal(_bits(got), _bits(quants.dequantize(data, qtype)))


def test_other_types_go_to_gguf_py() -> None:
    # Q4_K has no dequantizer of ours; a zero superblock decodes to zeros either way.
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    data = np.zeros((2, block_bytes), dtype=np.uint8)
    got = dequantize(data, Q.Q4_K)
    assert tuple(got.shape) == (2, block_values) and not got.any()


def test_partial_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="whole blocks"):
        dequantize(np.zeros((2, 33), dtype=np.uint8), Q.Q8_0)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 0.25)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.strs", ["a", "", "ü b"])
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_what_gguf_py_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {
        "plain": (values, Q.F32),
        "half": (values.astype(np.float16), Q.F16),
        "q8": (quants.quantize(values, Q.Q8_0), Q.Q8_0),
        "q4": (quants.quantize(values, Q.Q4_1), Q.Q4_1),
        "bf16": (quants.quantize(values, Q.BF16), Q.BF16),
    }
    path = tmp_path / "t.gguf"
    _write(path, tensors)
    parsed = read_gguf(path)
    meta = parsed.metadata
    assert meta["general.architecture"] == "llama"
    assert (meta["t.u8"], meta["t.i16"], meta["t.u32"], meta["t.i64"]) == (
        7,
        -300,
        4_000_000_000,
        -(2**40),
    )
    assert (meta["t.f32"], meta["t.f64"], meta["t.bool"]) == (0.25, 1e-300, True)
    assert meta["t.str"] == "héllo ✓" and meta["t.strs"] == ["a", "", "ü b"]
    assert meta["t.ints"].tolist() == [1, -2, 3]
    reference = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(parsed.tensors) == set(reference)
    for name, tensor in parsed.tensors.items():
        ref = reference[name]
        assert tensor.tensor_type == ref.tensor_type
        assert tensor.data.dtype == ref.data.dtype and tensor.data.shape == ref.data.shape
        assert np.array_equal(tensor.data, ref.data)
        assert tensor.shape == (4, 64)
        decoded = dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(_bits(decoded), _bits(quants.dequantize(ref.data, ref.tensor_type)))


def test_the_embedded_model_reads_as_gguf_py_reads_it() -> None:
    path = default_model_path()
    parsed = read_gguf(path)
    reference = gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):  # the reader's own header fields
            continue
        got = parsed.metadata[key]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == field.contents(), key
    assert len(parsed.tensors) == len(reference.tensors)
    kinds_seen = set()
    for ref in reference.tensors:
        tensor = parsed.tensors[ref.name]
        assert tensor.tensor_type == ref.tensor_type and np.array_equal(tensor.data, ref.data)
        if ref.tensor_type not in kinds_seen:  # one of each kind: Q8_0, Q4_1, F32
            kinds_seen.add(ref.tensor_type)
            expected = quants.dequantize(ref.data, ref.tensor_type)
            assert np.array_equal(_bits(dequantize(tensor.data, ref.tensor_type)), _bits(expected))
    assert {Q.Q8_0, Q.Q4_1, Q.F32} <= kinds_seen


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "magic",
        "version",
        "truncated header",
        "cut in a string array's string",
        "cut in a string array's length",
        "truncated data",
    ],
)
def test_damaged_files_raise_model_load_error(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.gguf"
    _write(good, {"w": (np.ones((2, 32), dtype=np.float32), Q.F32)})
    raw = bytearray(good.read_bytes())
    if damage == "empty":
        raw = bytearray()
    elif damage == "magic":
        raw[:4] = b"GGML"
    elif damage == "version":
        raw[4:8] = (1).to_bytes(4, "little")
    elif damage == "truncated header":
        raw = raw[:40]
    elif damage.startswith("cut in a string array"):  # t.strs's last string, "ü b"
        at = raw.index("ü b".encode())
        raw = raw[: at + 1] if damage.endswith("string") else raw[: at - 4]
    else:
        raw = raw[:-64]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError):
        read_gguf(bad)


def test_a_zero_alignment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="alignment"):
        read_gguf(path)
