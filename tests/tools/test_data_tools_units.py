"""Units of arc-data: segmentation at word boundaries, windows, the .npy encoding, reproducible tars."""

import json

import msgpack
import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers

from data_tools.sample_format import pack, unpack
from data_tools.samples import windows
from data_tools.segment import Segmenter, slicing_is_exact


@pytest.fixture(scope="module")
def encoder(tiny_models) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_models / "encoder" / "tokenizer.json"))


def check_segments(tokenizer: Tokenizer, text: str, segments) -> list[int]:
    """Segments tile the text; each one's ids are the tokenizer's encoding of its text alone. Returns lengths."""
    assert segments[0].start == 0 and segments[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    lengths = []
    for s in segments:
        alone = tokenizer.encode(text[s.start : s.end], add_special_tokens=False).ids
        if s.enc_ids is not None:
            assert s.enc_ids.tolist() == alone
        lengths.append(len(alone))
    return lengths


def corpus_text(tiny_models, n_chars: int) -> str:
    lines = (tiny_models / "corpus.jsonl").read_text().splitlines()
    return "\n\n".join(json.loads(line)["text"] for line in lines)[:n_chars]


def test_segments_cut_before_whitespace_at_about_n_tokens(encoder, tiny_models):
    text = corpus_text(tiny_models, 60_000)
    segmenter = Segmenter(encoder, 32, "uint16")
    assert segmenter.exact  # byte-level BPE: slicing the chunk's encoding equals encoding each segment alone
    segments = segmenter.segment([text])[0]
    lengths = check_segments(encoder, text, segments)
    assert max(lengths) <= 32 and min(lengths[:-1]) >= 16
    word_cuts = [s for s in segments[1:] if s.enc_ids is not None]  # the rest were cut inside an overlong "word"
    assert len(word_cuts) > 0.95 * (len(segments) - 1)
    assert all(text[s.start].isspace() and not text[s.start - 1].isspace() for s in word_cuts)


def test_chunk_edges_do_not_move_cuts(encoder, tiny_models):
    """Tiny chunks (many chunk edges, and chunks that hold no whole segment and must grow) cut where large do."""
    text = corpus_text(tiny_models, 20_000)
    large = Segmenter(encoder, 32, "uint16")
    small = Segmenter(encoder, 32, "uint16")
    small.chunk_chars = 50  # below one segment: every chunk must grow before a segment fits
    spans = [[(s.start, s.end) for s in seg.segment([text, text[:999]])[i]] for seg in (large, small) for i in (0, 1)]
    assert spans[0] == spans[2] and spans[1] == spans[3] and len(spans[0]) > 100


def test_overlong_word_is_cut_inside_and_encoded_alone(encoder):
    text = "short words first " + "x" * 3000 + " and after"
    segments = Segmenter(encoder, 16, "uint16").segment([text])[0]
    lengths = check_segments(encoder, text, segments)
    inside = [s for s in segments if 18 < s.start < 3018]
    assert inside and all(s.enc_ids is None for s in inside)  # cut inside the word: encoded on its own
    assert max(lengths) <= 16 + 2


def test_tokenizer_that_breaks_slicing_is_encoded_per_segment(tiny_models):
    """A normalizer that prepends to every input (Llama-2 style "▁") makes slices differ from per-segment
    encodings; the probe notices and every segment is then encoded on its own."""
    tokenizer = Tokenizer.from_file(str(tiny_models / "encoder" / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Prepend("Q")
    assert not slicing_is_exact(tokenizer)
    text = "Some words to cut into segments of a few tokens each, " * 40
    segmenter = Segmenter(tokenizer, 16, "uint16")
    segments = segmenter.segment([text])[0]
    assert len(segments) > 10 and all(s.enc_ids is None for s in segments)
    check_segments(tokenizer, text, segments)


def test_windows_keep_a_trailing_single_segment_with_the_previous_window():
    assert windows(1, 4) == [(0, 1)]
    assert windows(4, 4) == [(0, 4)]
    assert windows(5, 4) == [(0, 5)]
    assert windows(6, 4) == [(0, 4), (4, 6)]
    assert windows(9, 4) == [(0, 4), (4, 9)]
    assert windows(3, 1) == [(0, 1), (1, 2), (2, 3)]


SIZES = [(0, np.uint16, "|u1"), (255, np.uint16, "|u1"), (256, np.uint32, "<u2"), (70000, np.uint32, "<u4")]


@pytest.mark.parametrize(("n_ids", "dtype", "offsets_dtype"), SIZES)
def test_packed_sample_round_trips_with_the_smallest_offsets(n_ids, dtype, offsets_dtype):
    rng = np.random.default_rng(n_ids)
    ids = rng.integers(0, np.iinfo(dtype).max, n_ids, dtype=dtype)
    offsets = np.array([0, n_ids // 3, n_ids], dtype=np.int64)
    meta = {"doc_id": "d", "source": "s.jsonl", "window": 2, "n_segments": 2, "char_spans": [[0, 5], [5, 9]]}
    data = pack(meta, {"encoder": (ids, offsets), "llama": (ids[:0], np.zeros(3, np.int64))})
    # The documented layout, read with msgpack and numpy alone.
    raw = msgpack.unpackb(data)
    enc = raw.pop("tokens")["encoder"]
    assert raw == meta and (enc["dtype"], enc["offsets_dtype"]) == (np.dtype(dtype).str, offsets_dtype)
    assert np.frombuffer(enc["ids"], enc["dtype"]).tolist() == ids.tolist()
    assert np.frombuffer(enc["offsets"], enc["offsets_dtype"]).tolist() == offsets.tolist()
    got_meta, tokens = unpack(data)
    assert got_meta == meta and tokens["encoder"][0].tolist() == ids.tolist()
    assert tokens["llama"][1].dtype == np.uint8 and tokens["llama"][1].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1\xc1",
        msgpack.packb({"doc_id": "d"}),
        msgpack.packb([1, 2]),
        msgpack.packb({"tokens": {"e": {"ids": b"abc", "dtype": "<u2", "offsets": b"", "offsets_dtype": "|u1"}}}),
    ],
)
def test_unpack_refuses_what_is_not_a_sample_in_one_line(data):
    with pytest.raises(ValueError, match="^not a format-3 sample member: ") as err:
        unpack(data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["Llama=/m", "encoder=/m", "a" * 33 + "=/m"])
def test_a_bad_decoder_name_prints_the_rule(spec):
    from data_tools.tokenizer_set import DataError, parse_decoder

    with pytest.raises(DataError, match=r"NAME must match \[a-z0-9_\]\{1,32\} and not be 'encoder'$"):
        parse_decoder(spec)
