"""InstructModel: a checkpoint and its tokenizer, with the Alpaca prompt, limits and decoding around generate()."""

import logging
import os
import threading
from dataclasses import replace

import torch
import transformers

from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.cli import UsageError
from alpaca_trainml.data.prompts import load_style
from alpaca_trainml.generation import int8, prefix_cache
from alpaca_trainml.generation.batch import Job, run_to_end
from alpaca_trainml.generation.decoding import (
    Completion,
    GenParams,
    StopCriteria,
    check_params,
    cut_at_stop,
    generation_kwargs,
)
from alpaca_trainml.generation.kv_cache import left_pad
from alpaca_trainml.models import DEFAULT_MODEL_MAX_LENGTH, EMBEDDED_MODEL, check_checkpoint, from_pretrained
from alpaca_trainml.precision import resolve_dtype

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt has more tokens than the model was trained on, and truncation was not asked for."""


class TokenIdError(ValueError):
    """A prompt given as token ids holds one that is not in the vocabulary."""


class ContextLengthError(ValueError):
    """Prompt plus max_tokens do not fit the model's context window (OpenAI's context_length_exceeded)."""


def training_length(tokenizer, context_window):
    """The prompt limit: the model_max_length train.py saved with the tokenizer, else 512."""
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n <= context_window else min(DEFAULT_MODEL_MAX_LENGTH, context_window)


class InstructModel:
    """A checkpoint and its tokenizer; generate() holds a lock, so calls from several threads run one at a time."""

    def __init__(
        self,
        model_name_or_path=None,
        max_prompt_tokens=None,
        device=None,
        dtype=None,
        *,
        model=None,
        tokenizer=None,
        base_model=None,
        speculative=None,
    ):
        """Load model_name_or_path (default $TRAINML_CHECKPOINT_PATH, else the embedded model), or wrap an already
        loaded `model` and `tokenizer` (train.py's demo answers, on the model being trained). dtype: None picks
        bf16/fp16 on a GPU and fp32 on CPU; "auto" bf16 where the device computes it natively (a CPU with
        AVX512-BF16/AMX too), else fp32; or a torch dtype or its name; "int8": fp32 quantized at load (int8.py).
        base_model: overrides an adapter's base.
        speculative: a speculative.Lookup to draft tokens from the prompt (batch.py verifies them), or None."""
        if model is not None:
            self.name, self.model, self.tokenizer = model_name_or_path or model.name_or_path, model, tokenizer
            dtype = model.dtype
        else:
            self.name = model_name_or_path or os.environ.get("TRAINML_CHECKPOINT_PATH") or EMBEDDED_MODEL
            dtype = self._load(device, dtype, base_model or os.environ.get("ALPACA_BASE_MODEL"))
        self.prompt_style = load_style(self.tokenizer, None if model is not None else self.name)  # train.py saved it
        self.prompt_style.adopt(self.tokenizer)
        self.context_window = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = max_prompt_tokens or training_length(self.tokenizer, self.context_window)
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.eos_ids = sorted({*eos, *self.prompt_style.stop_token_ids(self.tokenizer)})  # with its end of turn
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.speculative = speculative
        self.prefix_cache_mb = prefix_cache.DEFAULT_MB  # batch.DecodeBatch keeps prompts' keys and values for reuse
        self.lock = threading.Lock()  # one generate() at a time
        self.tokenizer_lock = threading.RLock()  # the tokenizer is shared with request threads that encode
        logger.info(
            "loaded %s on %s (%s): prompts up to %d tokens, context window %d",
            self.name,
            self.model.device,
            dtype,
            self.max_prompt_tokens,
            self.context_window,
        )

    def _load(self, device, dtype, base_model=None):
        cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
        quantized = dtype == "int8"  # loaded in fp32, then its linear layers quantized (int8.py)
        if quantized and (cuda or str(device or "cpu") != "cpu"):
            raise UsageError("--dtype int8 runs on a CPU (our decode kernel); on a GPU use bfloat16 or float16")
        dtype = resolve_dtype("float32" if quantized else dtype, "cuda" if cuda else "cpu")
        # device_map="auto" spreads a model too big for one GPU over all of them, as the fork did
        placement = dict(device_map="auto") if cuda and device is None else {}
        check_checkpoint(self.name)  # a folder without its tokenizer would load, then fail at the first request
        if adapters.is_adapter(self.name):
            self.model, self.tokenizer = adapters.load_merged(self.name, base_model, dtype=dtype, **placement)
        else:
            self.tokenizer = from_pretrained(transformers.AutoTokenizer, self.name)
            self.model = from_pretrained(transformers.AutoModelForCausalLM, self.name, dtype=dtype, **placement)
        self.model.eval()
        if not placement:
            self.model.to(device or "cpu")
        if quantized:
            int8.quantize_model(self.model)
            return "int8"
        return dtype

    def decode(self, ids):
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _ids(self, text, special=True):
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _prompt_ids(self, instruction, input=None):
        """Token ids of the prompt in the checkpoint's prompt style."""
        with self.tokenizer_lock:
            text = self.prompt_style.instruction_prompt(self.tokenizer, instruction, input)
        return self._ids(text, special=self.prompt_style.add_special_tokens)

    def encode_chat(self, messages, truncate=False, limit=None):
        """Token ids of a chat's prompt ([{"role", "content"}]): the checkpoint's own chat template applied with the
        generation prompt, exactly as `tokenizer.apply_chat_template` of the saved checkpoint (and so vLLM and
        llama.cpp) builds it. ValueError names a role or message the style cannot take. With truncate, the oldest
        turns (not system messages, not the last one) go until it fits. limit: as in encode()."""
        limit = self.max_prompt_tokens if limit is None else limit
        messages = list(messages)
        while True:
            with self.tokenizer_lock:
                ids = self.prompt_style.chat_ids(self.tokenizer, messages)
            if len(ids) <= limit:
                return ids
            oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] not in ("system", "developer")), None)
            if not truncate or oldest is None:
                hint = "pass truncate=true to drop its oldest turns" if not truncate else "shorten the last message"
                raise self._too_long(len(ids), hint, limit)
            del messages[oldest]

    def _too_long(self, n, hint, limit=None):
        if limit is not None and limit != self.max_prompt_tokens:
            return PromptTooLongError(f"the prompt is {n} tokens; at most {limit} fit here. Shorten it, or {hint}")
        return PromptTooLongError(
            f"the prompt is {n} tokens; this model was trained on at most "
            f"{self.max_prompt_tokens}. Shorten it, or {hint}"
        )

    @property
    def vocab_size(self):
        """Token ids below this are valid: the tokenizer's and the embedding's sizes, the smaller."""
        return min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)

    def start_ids(self):
        """An empty prompt's ids: the beginning-of-text token (end-of-text where there is none), as OpenAI starts."""
        bos = self.tokenizer.bos_token_id
        return [bos if bos is not None else self.eos_ids[0]]

    def encode(self, prompt, truncate=False, limit=None):
        """Token ids of a raw prompt, text or token ids (checked against the vocabulary); an empty one starts from
        start_ids(). With truncate, an over-long prompt keeps its last tokens (and a leading BOS).

        limit: the most prompt tokens (default: the training length, max_prompt_tokens)."""
        if isinstance(prompt, str):
            ids = self._ids(prompt)
        else:
            bad = [i for i in prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise TokenIdError(f"token ids {bad[:5]} are not in the vocabulary (0 to {self.vocab_size - 1})")
            ids = list(prompt)
        ids = ids or self.start_ids()
        limit = self.max_prompt_tokens if limit is None else limit
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise self._too_long(len(ids), "pass truncate=true to keep its last tokens", limit)
        bos = ids[:1] if ids[0] == self.tokenizer.bos_token_id else []
        return bos + ids[len(ids) - (limit - len(bos)) :]

    def encode_instruction(self, instruction, input=None, truncate=False, limit=None):
        """Token ids of the prompt (the checkpoint's prompt style; Alpaca by default). With truncate, an over-long
        input (or, without one, the instruction) is cut at its end so that the template around it stays whole.
        limit: as in encode()."""
        ids = self._prompt_ids(instruction, input)
        limit = self.max_prompt_tokens if limit is None else limit
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise self._too_long(len(ids), "pass truncate=true to cut the end of the input", limit)
        text = input or instruction
        for _ in range(4):  # a cut can re-tokenize a token longer; retry a few times
            over = len(ids) - limit
            if over <= 0:
                return ids
            field = self._ids(text, special=False)
            if len(field) <= over:
                raise self._too_long(
                    len(ids), "shorten the instruction: the template and instruction alone are too long", limit
                )
            text = self.decode(field[: len(field) - over - 1])
            ids = self._prompt_ids(instruction, text) if input else self._prompt_ids(text)
        raise self._too_long(len(ids), "shorten the input", limit)

    def check_fits(self, n_prompt, max_tokens):
        if n_prompt + max_tokens > self.context_window:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_window} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
                "Please reduce your prompt; or completion length."
            )  # OpenAI's wording, which clients look for

    def generate(self, prompts, params, on_text=None, cancel=None, row_max_tokens=None):
        """One Completion per prompt (token id lists), decoded together by the decoder core (batch.py), the same
        one serve.py's engine runs; beam search goes through transformers' generate().

        row_max_tokens: each row's own max_tokens (default params.max_tokens).
        on_text(delta) streams the text of a single prompt as it grows; cancel (a threading.Event) stops early."""
        limits = list(row_max_tokens or [params.max_tokens] * len(prompts))
        for ids, limit in zip(prompts, limits):
            check_params(replace(params, max_tokens=limit), self.context_window)
            self.check_fits(len(ids), limit)
        if params.num_beams > 1:
            results = self._beam_search(prompts, params, cancel, limits)
            if on_text is not None and results[0].text:  # beams cannot stream: the whole text at the end
                on_text(results[0].text)
            return results
        stream = on_text if len(prompts) == 1 else None
        jobs = [Job(list(p), replace(params, max_tokens=n), on_text=stream) for p, n in zip(prompts, limits)]
        return run_to_end(self, jobs, cancel)

    @torch.inference_mode()
    def _beam_search(self, prompts, params, cancel, limits):
        width = max(len(ids) for ids in prompts)
        input_ids, mask = left_pad(prompts, self.pad_id, self.model.device)
        criteria = transformers.StoppingCriteriaList([StopCriteria(self.decode, width, params.stop, cancel)])
        with self.lock:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(limits),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                stopping_criteria=criteria,
                **generation_kwargs(params),
            )
        return [
            self._finish(row[width : width + limit].tolist(), len(p), params.stop, limit)
            for row, p, limit in zip(out, prompts, limits)
        ]

    def _finish(self, new_ids, n_prompt, stops, limit):
        """Cut one row at its end-of-text token and stop string."""
        ends = [i for i, t in enumerate(new_ids) if t in self.eos_ids or t == self.pad_id]  # rows done early are padded
        used = new_ids[: ends[0] + 1] if ends else new_ids
        text, stopped = cut_at_stop(self.decode(used), stops)
        reason = "stop" if ends or stopped or len(used) < limit else "length"
        return Completion(text, n_prompt, len(used), reason)


TEST_INSTRUCTION = "List three technologies that make life easier."  # weight_diff.py recover's test generation


def sample_completion(path, device="cpu", instruction=TEST_INSTRUCTION, max_length=256):
    """One sampled completion (top_p 0.9, as the original recover) from the model in `path`, printed."""
    model = InstructModel(str(path), device=device, dtype="float32")
    ids = model.encode_instruction(instruction)
    # max_length counts the prompt, as in the original; a prompt that long still gets a few new tokens
    params = GenParams(max_tokens=max(max_length - len(ids), 16), temperature=1.0, top_p=0.9)
    completion = model.generate([ids], params)[0].text
    print(f"Instruction: {instruction}\nCompletion: {completion}")
    return completion
