"""Segment ids sliced out of one encoding per run (data_tools/segment_ids.py), the vectorized word boundaries of
the segmenter, and the direct USTAR writer: each gives exactly what the slower way it replaces gives."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from helpers import metaspace_tokenizer
from tokenizers import Tokenizer, normalizers
from transformers import AutoTokenizer

from data_tools.boundaries import PieceEncoder, slices_exactly
from data_tools.inputs import Doc
from data_tools.segment import PROBE, Segmenter, _word_boundaries, _word_boundary, is_space
from data_tools.segment_ids import _runs, _slices, segment_ids
from data_tools.shards import TAR_META
from data_tools.tar_writer import TarWriter


def corpus_docs(tiny_models, n: int) -> list[Doc]:
    lines = (tiny_models / "corpus.jsonl").read_text().splitlines()[:n]
    texts = [json.loads(line)["text"] for line in lines] + [PROBE, "tail  \n\n  words 1234567 end.\n\n"]
    return [Doc(str(k), hashlib.sha256(text.encode()).digest(), "test", text) for k, text in enumerate(texts)]


def flat_segments(encoder: Tokenizer, docs: list[Doc], segment_tokens: int = 16) -> list:
    segments = Segmenter(encoder, segment_tokens, "uint16").segment([d.text for d in docs])
    return [(d, s) for d, doc_segments in zip(docs, segments) for s in doc_segments]


def check_sliced_ids(tokenizer: Tokenizer, flat: list, min_sliced: float) -> None:
    """segment_ids equals each segment's text encoded alone the way PieceEncoder encodes a piece (a document's
    first segment as the tokenizer encodes a text), and at least `min_sliced` of the segments came from slices."""
    pieces = PieceEncoder(tokenizer)
    assert slices_exactly(pieces)
    ids = segment_ids(pieces, flat, np.dtype("uint32"), sliced=True)
    for (doc, s), got in zip(flat, ids):
        assert got.tolist() == pieces.ids(doc.text[s.start : s.end], first=s.start == 0), doc.text[s.start : s.end]
    runs = _runs(flat)
    first = [(a, b) for a, b in runs if flat[a][1].start == 0]
    encodings = pieces.encode_batch([flat[a][0].text[flat[a][1].start : flat[b - 1][1].end] for a, b in first], True)
    slices = [
        x
        for (a, b), enc in zip(first, encodings)
        for x in _slices(enc, flat[a][0].text, [s for _, s in flat[a:b]], np.dtype("uint32"))
    ]
    assert sum(x is not None for x in slices) >= min_sliced * len(slices)


@pytest.fixture(scope="module")
def encoder(tiny_models) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_models / "encoder" / "tokenizer.json"))


@pytest.mark.parametrize("name", ["encoder", "llama", "mistral"])
def test_byte_level_decoders_slice_exactly(tiny_models, encoder, name):
    flat = flat_segments(encoder, corpus_docs(tiny_models, 40))
    check_sliced_ids(Tokenizer.from_file(str(tiny_models / name / "tokenizer.json")), flat, 0.9)


def test_metaspace_decoder_slices_without_the_dummy_prefix(tiny_models, encoder, tmp_path):
    docs = corpus_docs(tiny_models, 40)
    tokenizer = metaspace_tokenizer(tmp_path / "meta", [d.text for d in docs])
    check_sliced_ids(tokenizer, flat_segments(encoder, docs), 0.5)


def test_smollm2_decoder_slices_exactly(smollm2, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(smollm2).backend_tokenizer
    check_sliced_ids(tokenizer, flat_segments(tokenizer, corpus_docs(tiny_models, 30)), 0.9)


def test_gemma3_decoder_slices_exactly(gemma3, smollm2, tiny_models):
    """Gemma 3's SentencePiece-style BPE (spaces as "▁", byte fallback, no pre-tokenizer: merges may cross words)
    behind SmolLM2's segments, as in the demo."""
    tokenizer = AutoTokenizer.from_pretrained(gemma3).backend_tokenizer
    encoder = AutoTokenizer.from_pretrained(smollm2).backend_tokenizer
    check_sliced_ids(tokenizer, flat_segments(encoder, corpus_docs(tiny_models, 30)), 0.9)


def test_a_tokenizer_that_does_not_slice_exactly_is_encoded_per_segment(tiny_models, encoder):
    """A normalizer that prepends to every input makes slices differ; the probe notices, and every segment is then
    encoded alone (still the right ids)."""
    tokenizer = Tokenizer.from_file(str(tiny_models / "llama" / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Prepend("Q")
    pieces = PieceEncoder(tokenizer)
    assert not slices_exactly(pieces)
    flat = flat_segments(encoder, corpus_docs(tiny_models, 5))
    for (doc, s), got in zip(flat, segment_ids(pieces, flat, np.dtype("uint32"), sliced=False)):
        assert got.tolist() == tokenizer.encode(doc.text[s.start : s.end], add_special_tokens=False).ids


def test_word_boundaries_are_those_the_per_token_search_finds(tiny_models, encoder):
    for doc in corpus_docs(tiny_models, 20):
        for base in (0, 7):  # a chunk at the start of a document, and one inside it
            enc = encoder.encode(doc.text[base : base + 3000], add_special_tokens=False)
            j, c = _word_boundaries(enc, doc.text, base)
            expected = [(k, _word_boundary(enc, doc.text, base, k)) for k in range(1, len(enc))]
            assert list(zip(j, c)) == [(k, x) for k, x in expected if x is not None]


def test_is_space_is_str_isspace_for_every_code_point():
    text = "".join(map(chr, range(0x110000)))  # surrogates included
    assert is_space(text).tolist() == [ch.isspace() for ch in text]


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513], [3000, 10, 20_000]])
def test_tar_writer_writes_the_bytes_tarfile_writes(tmp_path, sizes):
    members = [(f"{k:08x}-{k:05d}.mp", bytes(range(256)) * (n // 256) + b"x" * (n % 256)) for k, n in enumerate(sizes)]
    writer = TarWriter(tmp_path / "a.tar", **TAR_META)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "arc", "arc"
            tar.addfile(info, io.BytesIO(data))
    written = (tmp_path / "a.tar").read_bytes()
    assert written == buffer.getvalue()
    assert writer.offset == len(written) and writer.sha256.hexdigest() == hashlib.sha256(written).hexdigest()
