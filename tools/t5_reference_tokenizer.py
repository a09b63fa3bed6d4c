"""transformers' T5Tokenizer for a sentencepiece model, built without protobuf: for the
tokenizer.json the demo ships and for the T5 tokenizer parity tests.

transformers 5 reads a spiece.model directly only with protobuf installed; from the pieces,
their scores and the model's normaliser table it builds the same tokenizers pipeline.
"""

from __future__ import annotations

from pathlib import Path


def protobuf_fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: enough to pull one bytes field out
    of a SentencePiece model without the protobuf package."""
    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        yield key >> 3, value


def t5_reference_tokenizer(spiece_model: Path, **kwargs):
    """transformers.T5Tokenizer of `spiece_model` (ModelProto.normalizer_spec = 3,
    NormalizerSpec.precompiled_charsmap = 2); kwargs go to T5Tokenizer (e.g. extra_ids=0)."""
    import sentencepiece as spm
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(spiece_model))
    normalizer = next(v for n, v in protobuf_fields(sp.serialized_model_proto()) if n == 3)
    charsmap = next(v for n, v in protobuf_fields(normalizer) if n == 2)
    return transformers.T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                    _spm_precompiled_charsmap=charsmap, **kwargs)
