"""Tokenizer parity with transformers' CLIPTokenizer and T5Tokenizer.

Vocabularies are trained on text written here (tests/tiny_tokenizers.py): a CLIP-style
byte-level BPE and a SentencePiece unigram model with T5's special ids. transformers 5 has
one class per model (CLIPTokenizerFast and T5TokenizerFast are aliases of the
tokenizers-backed classes), so those are the reference.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dite.engine.errors import CheckpointError, InputError
from dite.models.tokenizers import CLIPTokenizer, T5Tokenizer, TruncationWarning
from tiny_tokenizers import BIG_PROMPT, make_corpus, t5_reference_tokenizer, train_clip_files, train_t5_spiece

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

CORPUS = make_corpus()


# ------------------------------------------------------------------------ CLIP vocabulary

@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """clip_l: pads with EOS (tokenizer_config.json); clip_g: pads with "!" (special_tokens_map.json)."""
    root = tmp_path_factory.mktemp("clip")
    vocab = train_clip_files(root / "clip_l")
    assert len(vocab) > 700 and vocab["!"] == 0
    (root / "clip_l" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
         "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}}))
    (root / "clip_g").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (root / "clip_g" / name).write_bytes((root / "clip_l" / name).read_bytes())
    (root / "clip_g" / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return root


def ref_encode(ref, texts, max_length):
    out = ref(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return out.input_ids, out.attention_mask


def assert_same(ref_ids, ref_mask, ours, texts):
    for k in range(len(texts)):
        assert ours.ids[k].tolist() == ref_ids[k].tolist(), f"prompt {k}: {texts[k]!r}"
        assert ours.mask[k].tolist() == ref_mask[k].tolist(), f"mask of prompt {k}: {texts[k]!r}"


@pytest.mark.parametrize("which,pad", [("clip_l", "<|endoftext|>"), ("clip_g", "!")])
def test_clip_matches_transformers(clip_folders, which, pad):
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / which)
    ours = CLIPTokenizer.from_folder(clip_folders / which)
    assert ref.pad_token == pad and ours.pad_id == ref.pad_token_id
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        batch = ours.encode(CORPUS)
    assert batch.ids.shape == batch.mask.shape == (len(CORPUS), 77) and batch.ids.dtype == torch.long
    assert_same(*ref_encode(ref, CORPUS, 77), batch, CORPUS)
    lengths = [len(ref(t).input_ids) for t in CORPUS]
    assert batch.truncated == [n > 77 for n in lengths] and 5 < sum(batch.truncated) < len(CORPUS) // 2
    # saved by transformers as tokenizer.json (+ configs), without vocab.json / merges.txt
    saved = clip_folders / f"{which}_saved"
    ref.save_pretrained(saved)
    (saved / "vocab.json").unlink(missing_ok=True)
    (saved / "merges.txt").unlink(missing_ok=True)
    again = CLIPTokenizer.from_folder(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        assert torch.equal(again.encode(CORPUS).ids, batch.ids)


def bmp_chars() -> list[str]:
    """Every character of the Basic Multilingual Plane but surrogates, sampling the large
    uniform blocks of CJK ideographs and Hangul syllables (letters all alike) to save time."""
    uniform = [(0x3400, 0xA000), (0xAC00, 0xD7A4)]
    return [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000
            and not any(lo <= c < hi and (c - lo) % 61 for lo, hi in uniform)]


def test_clip_every_character(clip_folders):
    # Each character between two letters: normalisation, word splitting, byte-level BPE.
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / "clip_g")
    texts = [f"a{c}b" for c in bmp_chars()]
    ours = [e.ids for e in CLIPTokenizer.from_folder(clip_folders / "clip_g")._tok.encode_batch(
        texts, add_special_tokens=False)]
    theirs = ref(texts, add_special_tokens=False).input_ids
    diff = [texts[k] for k in range(len(texts)) if ours[k] != theirs[k]]
    assert not diff, diff[:10]


def test_clip_pad_conventions(clip_folders):
    l, g = CLIPTokenizer.from_folder(clip_folders / "clip_l"), CLIPTokenizer.from_folder(clip_folders / "clip_g")
    a, b = l.encode(["a cat", ""]), g.encode(["a cat", ""])
    eos = l.eos_id
    assert a.ids[1, :3].tolist() == [l.bos_id, eos, eos] and b.ids[1, :3].tolist() == [g.bos_id, eos, 0]
    assert torch.equal(a.mask, b.mask) and a.mask[0].sum() == 4 and a.mask[1].sum() == 2
    # diffusers' bigG tokenizer reads a "!" written in the prompt as its pad token.
    assert g.encode(["wow!"]).ids[0, 4].item() == 0 and l.encode(["wow!"]).ids[0, 4].item() != 0
    assert CLIPTokenizer.from_folder(clip_folders / "clip_l", pad_token="!").pad_id == 0


def test_clip_truncation_warning(clip_folders):
    tok = CLIPTokenizer.from_folder(clip_folders / "clip_l")
    with pytest.warns(TruncationWarning, match=r"reads at most 77") as record:
        batch = tok.encode(["a short one", BIG_PROMPT])
    assert len(record) == 1 and "prompt 1" in str(record[0].message)
    assert batch.truncated == [False, True] and batch.mask[1].all() and batch.ids[1, -1] == tok.eos_id
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / "clip_l")
    assert batch.ids[1].tolist() == ref_encode(ref, [BIG_PROMPT], 77)[0][0].tolist()


# -------------------------------------------------------------------------- T5 vocabulary

@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    """spiece/: the sentencepiece model alone; json/: transformers' tokenizer.json of it."""
    root = tmp_path_factory.mktemp("t5")
    ref = t5_reference_tokenizer(train_t5_spiece(root / "spiece"))
    ref.save_pretrained(root / "json")
    assert not (root / "json" / "spiece.model").exists()
    return root, ref


@pytest.mark.parametrize("layout", ["spiece", "json"])
def test_t5_matches_transformers(t5_folders, layout):
    root, ref = t5_folders
    ours = T5Tokenizer.from_folder(root / layout)
    assert (ours.pad_id, ours.eos_id) == (ref.pad_token_id, ref.eos_token_id) == (0, 1)
    pieces = [ref(t).input_ids for t in CORPUS]
    assert sum(2 in p for p in pieces) > 10, "the corpus should reach unknown characters"
    for max_length in (120, 256, 300):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            batch = ours.encode(CORPUS, max_length)
        assert batch.ids.shape == (len(CORPUS), max_length)
        assert_same(*ref_encode(ref, CORPUS, max_length), batch, CORPUS)
        assert batch.truncated == [len(p) > max_length for p in pieces]
    assert any(batch.truncated)


def test_t5_every_character(t5_folders):
    # Each character between two letters: sentencepiece's NFKC table against the
    # tokenizers pipeline transformers builds around the same table.
    root, ref = t5_folders
    texts = [f"a{c}b" for c in bmp_chars()]
    ours = T5Tokenizer.from_folder(root / "spiece")._pieces(texts)
    theirs = ref(texts, add_special_tokens=False).input_ids
    diff = [texts[k] for k in range(len(texts)) if ours[k] != theirs[k]]
    assert not diff, diff[:10]


def test_t5_truncation_keeps_eos(t5_folders):
    root, _ = t5_folders
    tok = T5Tokenizer.from_folder(root / "spiece")
    with pytest.warns(TruncationWarning, match=r"reads at most 256"):
        batch = tok.encode([BIG_PROMPT, "a cat"], 256)
    assert batch.truncated == [True, False]
    assert batch.ids[0, -1] == tok.eos_id and batch.mask[0].all()
    short = batch.ids[1][batch.mask[1].bool()].tolist()
    assert short[-1] == tok.eos_id and (batch.ids[1][len(short):] == 0).all()
    assert tok.encode([""], 4).ids.tolist() == [[tok.eos_id, 0, 0, 0]]


# ------------------------------------------------------------------------------- errors

def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"vocab\.json and merges\.txt") as info:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json, or vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)  # merges.txt still missing
    with pytest.raises(CheckpointError, match=r"spiece\.model or tokenizer\.json") as info:
        T5Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")


def test_bad_input(clip_folders):
    tok = CLIPTokenizer.from_folder(clip_folders / "clip_l")
    with pytest.raises(InputError, match="prompt 1"):
        tok.encode(["ok", None])
    assert torch.equal(tok.encode("a cat").ids, tok.encode(["a cat"]).ids)
