"""A byte-level tokenizer: offline, no model file, torchtune's ``ModelTokenizer`` protocol."""

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torchtune.data import Message

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
#: 256 byte values, BOS, EOS, PAD and one spare id (the models' vocab_size).
VOCAB_SIZE = 260


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``, plus BOS 256, EOS 257 and PAD 258.

    Works with torchtune's datasets and recipes (``encode``, ``decode``,
    ``tokenize_messages``, ``__call__``, ``bos_id``, ``eos_id``, ``pad_id``,
    ``stop_tokens``, ``max_seq_len``). Messages are concatenated without a
    template; the loss mask hides every message marked ``masked`` (the prompt
    when ``train_on_input=False``).

    Args:
        max_seq_len (Optional[int]): truncate tokenized samples to this length.
    """

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, max_seq_len: Optional[int] = None) -> None:
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2 or None, got {max_seq_len!r}")
        self.max_seq_len = max_seq_len

    @property
    def stop_tokens(self) -> List[int]:
        return [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in token_ids:
            t = int(t)
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                out.extend({BOS_ID: b"<s>", EOS_ID: b"</s>", PAD_ID: b"<pad>"}.get(t, b"<unk>"))
        return out.decode("utf-8", errors="replace")

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        tokens, mask = [self.bos_id], [True]
        for message in messages:
            ids = self.encode(message.text_content, add_bos=False, add_eos=False)
            tokens += ids
            mask += [message.masked] * len(ids)
        if add_end_tokens:
            tokens.append(self.eos_id)
            mask.append(bool(messages and messages[-1].masked))
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"], add_end_tokens=not inference)
        return {**sample, "tokens": tokens, "mask": mask}


def byte_tokenizer(max_seq_len: Optional[int] = None) -> ByteTokenizer:
    """Builder for configs: ``tokenizer: {_component_: gqa_tune.data.byte_tokenizer, max_seq_len: 128}``."""
    return ByteTokenizer(max_seq_len=max_seq_len)
