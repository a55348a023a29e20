"""A Hugging Face model's own tokenizer, as a torchtune ``ModelTokenizer`` with its chat template.

torchtune 0.6.1's ``HuggingFaceBaseTokenizer`` only encodes and decodes. :class:`HFTokenizer` also renders the
model's chat template (Jinja, the way transformers renders it) in ``tokenize_messages``, so torchtune's datasets
(``instruct_dataset``, ``chat_dataset``, packing) and gqa_tune's recipes train and generate with the prompts the
model was tuned on. The tokens of a conversation are, token for token, what transformers'
``apply_chat_template`` gives: the whole rendered text is tokenized at once. The loss mask follows the messages:
each token belongs to the message whose rendered span holds it (the template's text around a message, such as
its role header or a default system prompt before the first one, included), and is masked where that message
is ``masked`` (torchtune's rule: the prompt, with ``train_on_input=False``); a generation prompt is masked.

Files read from the model directory: ``tokenizer.json`` (the ``tokenizers`` library), ``tokenizer_config.json``
(special tokens, the template) and ``chat_template.jinja`` (where transformers 5 saves the template).
"""

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torchtune.data import Message

from gqa_tune import _checks as checks

ROLES = ("system", "user", "assistant", "ipython", "tool")


def _token_text(value: Any) -> Optional[str]:
    """A special token as ``tokenizer_config.json`` writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """The tokenizer of a Hugging Face model directory (see the module docstring).

    Args:
        path (Union[str, Path]): the model directory (or a ``.gguf`` file: its conversion, :mod:`gqa_tune.hf.gguf`).
        max_seq_len (Optional[int]): truncate tokenized conversations to this length.

    Attributes:
        bos_id, eos_id, pad_id (Optional[int]): from ``tokenizer_config.json`` (``pad_id`` falls back to
            ``eos_id``); ``stop_tokens``: the EOS id (and ``generation_config.json``'s ``eos_token_id`` list).
        special_tokens (Dict[str, int]): every added special token.
        vocab_size (int): the tokenizer's vocabulary, added tokens included.
    """

    def __init__(self, path: Union[str, Path], max_seq_len: Optional[int] = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.suffix.lower() == ".gguf":  # the tokenizer of a GGUF file: its converted directory's
            from gqa_tune.hf.gguf import resolve_model_dir

            path = resolve_model_dir(path)
        checks.optional_positive_int("max_seq_len", max_seq_len)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"tokenizer path '{path}' has no tokenizer.json (a Hugging Face model directory)")
        self.path, self.max_seq_len = path, max_seq_len
        self._tok = Tokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        self.config: Dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: Optional[str] = template
        self.bos_token, self.eos_token = (
            _token_text(self.config.get("bos_token")),
            _token_text(self.config.get("eos_token")),
        )
        pad_token = _token_text(self.config.get("pad_token"))
        self.bos_id, self.eos_id = self._id(self.bos_token), self._id(self.eos_token)
        self.pad_id = self._id(pad_token) if pad_token is not None else self.eos_id
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        stops = [] if self.eos_id is None else [self.eos_id]
        generation = path / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            stops += [t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int) and t not in stops]
        self.stop_tokens: List[int] = stops
        self._template = None

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    # ---------------------------------------------------------------- torchtune's BaseTokenizer

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """``text``'s ids (no special tokens of the tokenizer's own post-processor), with BOS / EOS where asked
        and the tokenizer has them."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- the chat template

    def render(self, messages: List[Dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages`` (``[{"role": ..., "content": ...}]``), as transformers
        renders it (a sandboxed Jinja environment, ``trim_blocks``, ``lstrip_blocks``)."""
        if self.chat_template is None:
            raise ValueError(f"the tokenizer in '{self.path}' has no chat template (tokenizer_config.json or "
                             "chat_template.jinja)")  # fmt: skip
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"the chat template refused the conversation: {message}")

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
            self._template = env.from_string(self.chat_template)
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """``(tokens, mask)`` of ``messages`` rendered by the chat template; ``mask`` True = no loss there.

        With ``add_end_tokens=False`` (a prompt to generate from) the template's generation prompt follows the
        last message, when that message is not the assistant's.
        """
        plain = [{"role": m.role, "content": m.text_content} for m in messages]
        for m in plain:
            if m["role"] not in ROLES:
                raise ValueError(f"message role {m['role']!r} is not one of {', '.join(ROLES)}")
        prompt = not add_end_tokens and bool(plain) and plain[-1]["role"] != "assistant"
        text = self.render(plain, add_generation_prompt=prompt)
        # Each message's span: where the rendering of the conversation up to it ends.
        ends = [len(self.render(plain[: i + 1])) for i in range(len(plain))]
        encoding = self._tok.encode(text, add_special_tokens=False)
        tokens, mask = list(encoding.ids), []
        for start, _ in encoding.offsets:
            owner = next((i for i, end in enumerate(ends) if start < end), None)  # None: the generation prompt
            mask.append(True if owner is None else bool(messages[owner].masked))
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"], add_end_tokens=not inference)
        return {**sample, "tokens": tokens, "mask": mask}


def hf_tokenizer(path: Union[str, Path], max_seq_len: Optional[int] = None) -> HFTokenizer:
    """Builder for configs: ``tokenizer: {_component_: gqa_tune.data.hf_tokenizer, path: DIR, max_seq_len: 512}``."""
    return HFTokenizer(path, max_seq_len=max_seq_len)
