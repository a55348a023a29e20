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

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from gqa_tune.config_check import ConfigError, build_component, check_config, exits_on_config_error
from gqa_tune.generation import GenerationStats
from gqa_tune.generation import generate as gqa_generate
from gqa_tune.hf import model_shape
from gqa_tune.modules import setup_caches
from gqa_tune.ops.kv_quant import check_kv_cache_dtype, resolve_kv_cache_dtype
from gqa_tune.quantization import (
    build_quantizer,
    describe,
    quantize_model,
    quantizer_error,
    quantizer_limits,
    weight_bytes,
)
from gqa_tune.training.generation import GenerationResult, generate, kv_cache_bytes
from gqa_tune.training.weights import check_vocab, fit_weights, load_weights

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
    """Load a model and tokenizer once (:meth:`setup`), then generate for the configured prompts."""

    def __init__(self, cfg: DictConfig) -> None:
        self.device = torch.device(cfg.get("device", "cpu"))
        self.dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.get("kv_cache_dtype"))
        if self.kv_cache_dtype is not None:
            check_kv_cache_dtype(self.kv_cache_dtype, self.device)  # before anything is loaded
        self.quantizer = build_quantizer(cfg.quantizer) if cfg.get("quantizer") is not None else None
        if self.quantizer is not None:  # what is known to fail, before anything is loaded
            reason = quantizer_limits(self.quantizer, self.device, self.dtype)
            if reason is not None:
                raise quantizer_error(self.quantizer, self.device, self.dtype, reason)
        self.seed = training.set_seed(cfg.get("seed", 0))
        self.source = ""
        self.quantized = 0  # linear weights the quantizer replaced

    # ------------------------------------------------------------ setup

    def setup(self, cfg: DictConfig) -> None:
        self.tokenizer = build_component(cfg.tokenizer, "tokenizer")
        state_dict, builder, weights = self.load_weights(cfg)
        self.source = weights.name
        with training.set_default_dtype(self.dtype), self.device:
            model = build_component(builder, "model")
        # As in the fine-tune recipes: a LoRA builder's adapters may be absent (merged weights, B = 0).
        fit_weights(model, state_dict, weights)
        check_vocab(model.tok_embeddings.num_embeddings, self.tokenizer, weights, cfg.tokenizer.get("_component_", ""))
        self.stop_tokens = list(getattr(self.tokenizer, "stop_tokens", None) or [self.tokenizer.eos_id])
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.quantizer is not None:  # after the weights are in place; a kernel missing here fails now
            self.quantized = quantize_model(self.model, self.quantizer)

    def load_weights(self, cfg: DictConfig) -> tuple:
        """``(weights, builder config, source)`` (:func:`gqa_tune.training.weights.load_weights`): from
        ``hf_model_dir``, ``checkpointer`` (+ ``model``) or ``checkpoint_dir``."""
        hint = (
            "train a model first, e.g. `tune run gqa_tune/recipes/full_finetune_single_device.py "
            "--config configs/gqa_tiny/full.yaml`, or set checkpoint_dir=<dir> or hf_model_dir=<dir>"
        )
        return load_weights(cfg, checkpoint_key="checkpoint_dir", required=True, hint=hint)

    # ------------------------------------------------------------ generation

    def prompts(self, cfg: DictConfig) -> List[str]:
        """The prompts to run: ``prompt=`` from the command line, else ``prompt``, else ``prompts``."""
        if _CLI_PROMPTS:
            prompts: Any = list(_CLI_PROMPTS)
        elif cfg.get("prompt") is not None:
            prompts = [cfg.prompt]
        else:
            prompts = cfg.get("prompts")
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
        """Token ids per prompt (with BOS), checked to fit ``max_seq_len`` with the new tokens."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        encoded = [self.tokenizer.encode(p, add_bos=True, add_eos=False) for p in prompts]
        limit = self.model.max_seq_len
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        width = len(encoded[longest])
        if width + max_new_tokens > limit:
            raise ValueError(
                f"prompt {longest} is {width} tokens long; with max_new_tokens={max_new_tokens} generation needs "
                f"{width + max_new_tokens} positions, more than the model's max_seq_len={limit}: shorten the "
                f"prompt, lower max_new_tokens (at most {max(limit - width, 0)} here) or build the model with a "
                "larger max_seq_len (model.max_seq_len=N)"
            )
        return encoded

    def generate(self, cfg: DictConfig) -> GenerationResult:
        """Generate for the configured prompts, print the texts and statistics, return the result.

        ``result.extra`` holds ``prompts``, ``prompt_tokens`` and ``texts``.
        """
        prompts = self.prompts(cfg)
        max_new_tokens = cfg.get("max_new_tokens", 32)
        encoded = self.encode(prompts, max_new_tokens)
        temperature = float(cfg.get("temperature", 0.0))
        top_k = cfg.get("top_k")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or null, got {top_k!r}")
        stop_tokens = self.stop_tokens
        pad_id = self.tokenizer.pad_id

        stream = None
        if cfg.get("compile", False):
            result = self.generate_compiled(encoded, max_new_tokens, pad_id, stop_tokens, temperature, top_k, cfg)
        else:
            if len(prompts) == 1:
                stream = StreamPrinter(self.tokenizer, stop_tokens, pad_id)
                print(prompts[0], end="", flush=True)
            result = generate(
                self.model,
                encoded,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                stop_tokens=stop_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=cfg.get("seed") if temperature > 0 else None,
                on_tokens=stream,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        texts = [self.tokenizer.decode(ids) for ids in result.tokens]
        if stream is not None:
            stream.finish()
        else:
            for prompt, text in zip(prompts, texts):
                print(f"{prompt}{text}")
        result.extra.update({"prompts": prompts, "prompt_tokens": encoded, "texts": texts})
        self.report(result, temperature, top_k)
        if cfg.get("output_file"):
            self.write_output(Path(cfg.output_file), result)
        return result

    def generate_compiled(self, encoded, max_new_tokens, pad_id, stop_tokens, temperature, top_k, cfg):
        """``compile: true``: the batch through :func:`gqa_tune.generate` with its decode step compiled once
        (fixed shapes, no recompiles); the rates leave the compilation out (``compile_seconds`` in extra)."""
        longest = max(len(ids) for ids in encoded)
        prompt = torch.full((len(encoded), longest), pad_id, dtype=torch.long, device=self.device)
        for row, ids in enumerate(encoded):  # left padding: positions restart at each row's first token
            prompt[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        setup_caches(self.model, len(encoded), self.dtype, decoder_max_seq_len=longest + max_new_tokens,
                     kv_cache_dtype=self.kv_cache_dtype)  # fmt: skip
        rng = None
        if temperature > 0 and cfg.get("seed") is not None:
            rng = torch.Generator(device=self.device).manual_seed(int(cfg.seed))
        stats = GenerationStats()
        tokens, _ = gqa_generate(self.model, prompt, max_new_tokens, pad_id=pad_id, temperature=temperature,
                                 top_k=top_k, stop_tokens=stop_tokens, rng=rng, compile=True, stats=stats)  # fmt: skip
        rows, stopped = [], []
        for row in tokens[:, longest:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_tokens), len(row))
            rows.append(row[:cut])
            stopped.append(cut < len(row))
        result = GenerationResult(
            rows, stats.prefill_seconds, stats.decode_seconds, stats.prefill_tokens, stats.decode_tokens,
            kv_cache_bytes(self.model), stopped=stopped,
        )  # fmt: skip
        result.extra["compile_seconds"] = stats.compile_seconds
        return result

    def report(self, result: GenerationResult, temperature: float, top_k: Optional[int]) -> None:
        mode = "greedy" if temperature <= 0 else f"sampling (temperature {temperature}, top_k {top_k})"
        print(f"--- {len(result.tokens)} prompt(s), {mode}, weights from {self.source}")
        if self.quantizer is not None:
            print(
                f"weights: {self.quantized} linear layers quantized with {describe(self.quantizer)}; "
                f"{weight_bytes(self.model) / 2**20:.3f} MiB of parameters"
            )
        print(
            f"prefill: {result.prefill_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms "
            f"({result.prefill_tokens_per_s:.0f} tokens/s)"
        )
        compiled = result.extra.get("compile_seconds")
        print(
            f"decode: {result.decode_tokens} tokens in {result.decode_seconds * 1e3:.1f} ms "
            f"({result.decode_tokens_per_s:.0f} tokens/s)"
            + (f"; compiled step (its first call, {compiled:.1f} s, not counted)" if compiled is not None else "")
        )
        at_once = [i for i, (ids, stop) in enumerate(zip(result.tokens, result.stopped)) if stop and not ids]
        if at_once:
            which = "every prompt" if len(at_once) == len(result.tokens) else f"prompt(s) {at_once}"
            print(
                f"{which}: the first new token was a stop token ({self.stop_tokens}), so the answer is empty"
                + (" and nothing was decoded" if len(at_once) == len(result.tokens) else "")
            )
        shape = _attention_shape(self.model)
        line = f"KV cache: {result.kv_cache_bytes} bytes ({result.kv_cache_bytes / 2**20:.3f} MiB)"
        if shape is not None:
            n_h, n_kv = shape["num_heads"], shape["num_kv_heads"]
            mha = result.kv_cache_bytes * n_h // n_kv
            line += (
                f" for {n_kv} kv heads; a multi-head cache ({n_h} heads) would take {mha} bytes "
                f"({mha / 2**20:.3f} MiB, {n_h / n_kv:.1f}x)"
            )
        print(line, flush=True)

    def write_output(self, path: Path, result: GenerationResult) -> None:
        data: Dict[str, Any] = {
            "prompts": result.extra["prompts"],
            "prompt_tokens": result.extra["prompt_tokens"],
            "tokens": result.tokens,
            "texts": result.extra["texts"],
            "prefill_tokens": result.prefill_tokens,
            "prefill_seconds": result.prefill_seconds,
            "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens": result.decode_tokens,
            "decode_seconds": result.decode_seconds,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "kv_cache_bytes": result.kv_cache_bytes,
            "quantizer": describe(self.quantizer) if self.quantizer is not None else None,
            "weight_bytes": weight_bytes(self.model),
        }
        shape = _attention_shape(self.model)
        if shape is not None:
            data.update(shape)
            data["mha_kv_cache_bytes"] = result.kv_cache_bytes * shape["num_heads"] // shape["num_kv_heads"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")


def _attention_shape(model: torch.nn.Module) -> Optional[Dict[str, int]]:
    try:
        return model_shape(model)
    except (AttributeError, IndexError, TypeError):
        return None


@config.parse
@exits_on_config_error
def recipe_main(cfg: DictConfig) -> None:
    check_config(cfg, recipe=__file__, overrides=sys.argv[1:])  # before anything is built
    recipe = GenerateRecipe(cfg)
    recipe.setup(cfg)
    recipe.generate(cfg)


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
