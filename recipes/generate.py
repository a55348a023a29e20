"""Generate text from a checkpoint with GQA-sized KV caches, on one device.

    tune run gqa_tune/recipes/generate.py --config configs/gqa_tiny/generate.yaml
    tune run gqa_tune/recipes/generate.py --config configs/gqa_tiny/generate.yaml prompt="37+45="

Config keys (see ``configs/gqa_tiny/generate.yaml``):

- ``checkpoint_dir``: a checkpoint written by gqa_tune's recipes (``model.safetensors`` +
  ``config.json``), or their ``output_dir``: when it holds a ``LATEST`` file, the checkpoint
  it names is loaded. Also a torchtune checkpointer's ``output_dir`` (its highest ``epoch_N``)
  or any Hugging Face model directory. The model is rebuilt from the builder config stored in
  ``config.json`` (``config["gqa_tune"]["model"]``, else the one its architecture maps to); a
  ``model:`` with a ``_component_`` replaces it, a ``model:`` without one overrides single
  arguments (e.g. ``model.max_seq_len=256``).
- ``hf_model_dir``: a Hugging Face model directory (Llama, Mistral, Qwen2, Gemma, Gemma 2); its
  architecture and weights replace ``checkpoint_dir``, ``checkpointer`` and ``model``'s builder.
- ``checkpointer``: instead of ``checkpoint_dir``, any torchtune checkpointer; needs ``model:``.
  Where the weights come from is :func:`gqa_tune.training.weights.load_weights`'s decision.
- ``tokenizer``: e.g. ``gqa_tune.data.byte_tokenizer``. Its ``stop_tokens`` (EOS) end a sequence.
- ``prompts``: a list of prompts, generated as one left-padded batch; or ``prompt``, one
  prompt. ``prompt=TEXT`` on the command line (repeatable, one prompt each) replaces both and
  may contain ``=``, which torchtune's own override parser rejects.
- ``max_new_tokens``, ``temperature`` (0: greedy), ``top_k`` (``null``: all), ``seed``
  (sampling and the global seed), ``device``, ``dtype``.
- ``kv_cache_dtype``: ``null`` (caches in ``dtype``), ``int8`` or ``float8_e4m3fn``: KV caches
  stored quantized, with a float32 scale per token and kv head (0.27x the bytes of fp32 at
  head_dim 64); a dtype the device cannot run is refused, naming both.
- ``quantizer``: optional; a torchao quantization config (``_component_``), applied to the linear
  layers after the weights are loaded (:mod:`gqa_tune.quantization`): e.g.
  ``torchao.quantization.Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``, or
  ``Int4WeightOnlyConfig`` with ``layout: {_component_: torchao.dtypes.Int4CPULayout}`` and
  ``version: 1`` on a CPU. A config that cannot run on this device and dtype is refused at setup,
  naming it and why.
- ``output_file``: optional; writes prompts, generated token ids, texts and timings as JSON.

With one prompt, the text is printed as it is generated; with several, all are printed at
the end. Then prefill and decode throughput and the KV-cache bytes (and what a full
multi-head cache of the same model would take) are printed.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from gqa_tune.config_check import ConfigError, build_component, exits_on_config_error, parse_config
from gqa_tune.generation import (
    GenerationStats,
    encode_prompts,
    generate,
    has_chat_template,
    left_padded,
    new_tokens,
    padding_id,
)
from gqa_tune.hf import model_shape
from gqa_tune.ops.kv_quant import check_kv_cache_dtype, resolve_kv_cache_dtype
from gqa_tune.quantization import (
    build_quantizer,
    describe,
    quantize_model,
    quantizer_error,
    quantizer_limits,
    weight_bytes,
)
from gqa_tune.schema import GenerateConfig
from gqa_tune.training.weights import check_vocab, fit_weights, load_weights, tokenizer_line

#: ``prompt=...`` arguments taken off the command line before torchtune parses it (see :func:`main`).
_CLI_PROMPTS: List[str] = []


class StreamPrinter:
    """Prints one row's new text as tokens arrive, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Any, stop_tokens: List[int], pad_id: int, row: int = 0) -> None:
        self.tokenizer, self.stop_tokens, self.pad_id, self.row = tokenizer, set(stop_tokens), pad_id, row
        self.ids: List[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, new_ids: torch.Tensor) -> None:
        if self.done:
            return
        token = int(new_ids[self.row])
        if token in self.stop_tokens or token == self.pad_id:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return
        print(text[len(self.printed) :], end="", flush=True)
        self.printed = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        print(text[len(self.printed) :], flush=True)
        self.printed = text


class GenerateRecipe:
    """Load a model and tokenizer once (:meth:`setup`), then generate for the configured prompts
    (:meth:`generate`), through :func:`gqa_tune.generate`: eagerly, or with ``compile: true`` its compiled
    decode step."""

    def __init__(self, cfg: DictConfig, *, overrides: Sequence[str] = ()) -> None:
        self.cfg = cfg = parse_config(cfg, GenerateConfig, overrides)  # the one check; the typed config
        self.device = torch.device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype)
        if self.kv_cache_dtype is not None:
            check_kv_cache_dtype(self.kv_cache_dtype, self.device)  # before anything is loaded
        self.quantizer = build_quantizer(cfg.quantizer) if cfg.quantizer is not None else None
        if self.quantizer is not None:  # what is known to fail, before anything is loaded
            reason = quantizer_limits(self.quantizer, self.device, self.dtype)
            if reason is not None:
                raise quantizer_error(self.quantizer, self.device, self.dtype, reason)
        self.seed = training.set_seed(cfg.seed)
        self.quantized = 0  # linear weights the quantizer replaced

    # ------------------------------------------------------------ setup

    def setup(self, cfg: Optional[DictConfig] = None) -> None:
        """The tokenizer and the model with its weights (from ``hf_model_dir``, ``checkpointer`` (+ ``model``) or
        ``checkpoint_dir``: :func:`gqa_tune.training.weights.load_weights`), quantized with ``quantizer``."""
        cfg = self.cfg
        self.tokenizer = build_component(cfg.tokenizer, "tokenizer")
        hint = (
            "train a model first, e.g. `tune run gqa_tune/recipes/full_finetune_single_device.py "
            "--config configs/gqa_tiny/full.yaml`, or set checkpoint_dir=<dir> or hf_model_dir=<dir>"
        )
        state_dict, builder, weights = load_weights(cfg, checkpoint_key="checkpoint_dir", required=True, hint=hint)
        self.source = weights.name
        with training.set_default_dtype(self.dtype), self.device:
            model = build_component(builder, "model")
        # As in the fine-tune recipes: a LoRA builder's adapters may be absent (merged weights, B = 0).
        fit_weights(model, state_dict, weights)
        check_vocab(model.tok_embeddings.num_embeddings, self.tokenizer, weights, cfg.tokenizer._component_)
        print(tokenizer_line(self.tokenizer, cfg.tokenizer._component_, weights), file=sys.stderr)
        self.stop_tokens = list(getattr(self.tokenizer, "stop_tokens", None) or [self.tokenizer.eos_id])
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.quantizer is not None:  # after the weights are in place; a kernel missing here fails now
            self.quantized = quantize_model(self.model, self.quantizer)

    # ------------------------------------------------------------ generation

    def prompts(self, cfg: Optional[DictConfig] = None) -> List[str]:
        """The prompts to run: ``prompt=`` from the command line, else ``prompt``, else ``prompts``."""
        cfg = self.cfg if cfg is None else cfg
        if _CLI_PROMPTS:
            prompts: Any = list(_CLI_PROMPTS)
        elif cfg.prompt is not None:
            prompts = cfg.prompt
        else:
            prompts = cfg.prompts
        prompts = OmegaConf.to_container(prompts) if OmegaConf.is_config(prompts) else prompts
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            problem = "no prompts: set `prompts: [...]` in the config or pass prompt=TEXT on the command line"
            raise ConfigError(problem, what="prompts")
        if not isinstance(prompts, (list, tuple)):
            raise ConfigError(f"prompts must be a list of strings, got {type(prompts).__name__}", what="prompts")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, (str, int, float)) or str(prompt) == "":
                raise ConfigError(f"prompt {i} is empty or not text: {prompt!r}", what="prompts")
        return [str(p) for p in prompts]

    def encode(self, prompts: List[str], max_new_tokens: int) -> List[List[int]]:
        """Token ids per prompt, checked to fit ``max_seq_len`` with the new tokens: with BOS
        (``prompt_format: text``), or as a user message through the tokenizer's chat template, its generation
        prompt after it (``chat``)."""
        chat = self.cfg.prompt_format == "chat"
        if chat and not has_chat_template(self.tokenizer):
            raise ConfigError(
                f"prompt_format=chat needs a tokenizer with a chat template (gqa_tune.data.hf_tokenizer), not "
                f"{self.cfg.tokenizer._component_}",
                what="prompt_format",
            )
        encoded = encode_prompts(self.tokenizer, prompts, chat)
        limit = self.model.max_seq_len
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        width = len(encoded[longest])
        if width + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {longest} is {width} tokens long; with max_new_tokens={max_new_tokens} generation needs "
                f"{width + max_new_tokens} positions, more than the model's max_seq_len={limit}: shorten the "
                f"prompt, lower max_new_tokens (at most {max(limit - width, 0)} here) or build the model with a "
                "larger max_seq_len (model.max_seq_len=N)",
                what="max_new_tokens",
            )
        return encoded

    def generate(self, cfg: Optional[DictConfig] = None) -> Dict[str, Any]:
        """Generate for the configured prompts as one left-padded batch, print the texts and statistics.

        Returns:
            What ``output_file`` holds: ``prompts``, ``prompt_tokens``, ``tokens`` (the new ids of each prompt,
            its stop token excluded), ``stopped`` (whether each ended at a stop token), ``texts``, the timings
            (:class:`gqa_tune.GenerationStats`'s), ``kv_cache_bytes`` and the weights' bytes.
        """
        cfg = self.cfg
        prompts = self.prompts()
        encoded = self.encode(prompts, cfg.max_new_tokens)
        pad_id = padding_id(encoded, self.tokenizer)
        batch = left_padded(encoded, pad_id, self.device)
        rng = None
        if cfg.temperature > 0 and cfg.seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(cfg.seed)
        stream = None
        sep = "\n" if cfg.prompt_format == "chat" else ""  # a chat answer on its own line; text continues the prompt
        if len(prompts) == 1 and not cfg.compile:  # compiled, the output is printed at the end
            stream = StreamPrinter(self.tokenizer, self.stop_tokens, pad_id)
            print(prompts[0], end=sep, flush=True)
        stats = GenerationStats()
        tokens, _ = generate(
            self.model, batch, cfg.max_new_tokens, pad_id=pad_id, temperature=cfg.temperature,
            top_k=cfg.top_k, stop_tokens=self.stop_tokens, rng=rng, compile=cfg.compile, stats=stats,
            on_tokens=stream, kv_cache_dtype=self.kv_cache_dtype,
        )  # fmt: skip
        ids, stopped = new_tokens(tokens, batch.shape[1], self.stop_tokens)
        texts = [self.tokenizer.decode(row) for row in ids]
        if stream is not None:
            stream.finish()
        else:
            for prompt, text in zip(prompts, texts):
                print(f"{prompt}{sep}{text}")
        result = {
            "prompts": prompts, "prompt_tokens": encoded, "tokens": ids, "stopped": stopped, "texts": texts,
            **dataclasses.asdict(stats),
            "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
            "quantizer": describe(self.quantizer) if self.quantizer is not None else None,
            "weight_bytes": weight_bytes(self.model),
        }  # fmt: skip
        shape = _attention_shape(self.model)
        if shape is not None:
            result.update(shape, mha_kv_cache_bytes=stats.kv_cache_bytes * shape["num_heads"] // shape["num_kv_heads"])
        self.report(result, shape)
        if cfg.output_file:
            path = Path(cfg.output_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {path}")
        return result

    def report(self, result: Dict[str, Any], shape: Optional[Dict[str, int]]) -> None:
        cfg = self.cfg
        mode = "greedy" if cfg.temperature <= 0 else f"sampling (temperature {cfg.temperature}, top_k {cfg.top_k})"
        print(f"--- {len(result['tokens'])} prompt(s), {mode}, weights from {self.source}")
        if self.quantizer is not None:
            print(
                f"weights: {self.quantized} linear layers quantized with {describe(self.quantizer)}; "
                f"{result['weight_bytes'] / 2**20:.3f} MiB of parameters"
            )
        print(
            f"prefill: {result['prefill_tokens']} tokens in {result['prefill_seconds'] * 1e3:.1f} ms "
            f"({result['prefill_tokens_per_s']:.0f} tokens/s)"
        )
        compiled = f"; compiled step (its first call, {result['compile_seconds']:.1f} s, not counted)"
        print(
            f"decode: {result['decode_tokens']} tokens in {result['decode_seconds'] * 1e3:.1f} ms "
            f"({result['decode_tokens_per_s']:.0f} tokens/s)" + (compiled if result["compiled"] else "")
        )
        at_once = [i for i, (ids, stop) in enumerate(zip(result["tokens"], result["stopped"])) if stop and not ids]
        if at_once:
            which = "every prompt" if len(at_once) == len(result["tokens"]) else f"prompt(s) {at_once}"
            print(
                f"{which}: the first new token was a stop token ({self.stop_tokens}), so the answer is empty"
                + (" and nothing was decoded" if len(at_once) == len(result["tokens"]) else "")
            )
        size = result["kv_cache_bytes"]
        line = f"KV cache: {size} bytes ({size / 2**20:.3f} MiB)"
        if shape is not None:
            n_h, n_kv, mha = shape["num_heads"], shape["num_kv_heads"], result["mha_kv_cache_bytes"]
            line += (
                f" for {n_kv} kv heads; a multi-head cache ({n_h} heads) would take {mha} bytes "
                f"({mha / 2**20:.3f} MiB, {n_h / n_kv:.1f}x)"
            )
        print(line, flush=True)


def _attention_shape(model: torch.nn.Module) -> Optional[Dict[str, int]]:
    try:
        return model_shape(model)
    except (AttributeError, IndexError, TypeError):
        return None


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    recipe = GenerateRecipe(cfg, overrides=sys.argv[1:])  # checks the whole config first
    recipe.setup()
    recipe.generate()


def take_prompt_args(argv: List[str]) -> List[str]:
    """Remove ``prompt=TEXT`` arguments from ``argv`` (in place) and return the texts.

    torchtune's override parser splits ``key=value`` on every ``=`` (so ``prompt=1+2=``
    is rejected) and parses values as YAML; these prompts are kept verbatim instead.
    """
    prompts = [arg[len("prompt=") :] for arg in argv[1:] if arg.startswith("prompt=")]
    argv[1:] = [arg for arg in argv[1:] if not arg.startswith("prompt=")]
    return prompts


def main() -> None:
    _CLI_PROMPTS[:] = take_prompt_args(sys.argv)
    recipe_main()


if __name__ == "__main__":
    sys.exit(main())
