"""
Pretrained Hugging Face checkpoints, read by hand: a piece a reader can skip, imported only
when --init names a Hugging Face directory (or a checkpoint tuned from one). Nothing from
transformers or tokenizers runs here.

- `HFTokenizer`: a tokenizer.json (byte-level BPE: GPT-2, Llama 3, SmolLM2, Qwen2/2.5/3) as a
  tiktoken Encoding, with the byte-level Tokenizer's interface (data.py).
- `load_pretrained`: config.json and safetensors (one file or shards) into model.GPT, for the
  Llama, Qwen2 and Qwen3 families; every error names its file.
"""

import json
import math
import os
import unicodedata

import tiktoken
import torch

from data import InputError
from model import GPT, CheckpointError, GPTConfig

# -----------------------------------------------------------------------------
# tokenizer.json


def read_json(path, error=InputError):
    """A JSON file of a model directory; one that is not JSON raises `error`, naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def bytes_to_unicode():
    """
    GPT-2's byte-level alphabet: every byte as one printable unicode character (printable
    Latin-1 bytes map to themselves, the rest to 256, 257, ...). tokenizer.json's byte-level
    vocab is written in it.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


# the GPT-2 pre-tokenizer regex, as tokenizers' ByteLevel(use_regex=True) applies it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the same after Digits(individual_digits=True) (SmolLM2): every digit its own piece, and a
# whitespace run before a digit ends there as it would at the end of a piece
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


class HFTokenizer:
    """
    A Hugging Face tokenizer.json (byte-level BPE: GPT-2, Llama 3, SmolLM2, Qwen2/2.5/3) as a
    tiktoken Encoding, with the interface of the byte-level Tokenizer: encode (untrusted text:
    special-token strings stay text), encode_prompt (BOS, then the text), encode_with_specials,
    decode, eot (the end token a training completion ends with), stop_tokens, bos, pad,
    vocab_size (ids the tokenizer can decode), source (the directory it came from). The BOS and
    an EOS come from the file's post_processor, as tokenizers adds them to a single sequence
    (Llama 3.x: <|begin_of_text|>; Qwen: none). No transformers or tokenizers at run time.
    """

    def __init__(self, model_dir):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise InputError(f"{model_dir}: no tokenizer.json")
        spec = read_json(path)
        bpe = spec.get("model") or {}
        if bpe.get("type") != "BPE":
            raise InputError(f"{path}: model type {bpe.get('type')!r}; only byte-level BPE is supported")
        self.nfc = self._normalizer(spec.get("normalizer"), path)
        pattern = self._pattern(spec.get("pre_tokenizer"), path)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        to_bytes = lambda token: bytes(byte_of[c] for c in token)
        try:
            ranks = {to_bytes(t): i for t, i in bpe["vocab"].items()}
        except KeyError as e:
            raise InputError(f"{path}: vocab token with a character outside the byte-level alphabet ({e}); not a "
                             "byte-level BPE") from None
        # tiktoken merges the adjacent pair whose result has the lowest id; tokenizers merges by the
        # order of `merges`. They agree when result ids never decrease along the merge list. Several
        # merges may make one token (Llama 3: 'ĠĠ'+'ĠĠ' and 'Ġ'+'ĠĠĠ' both give 'ĠĠĠĠ'): equal ids are
        # fine, since the same bytes come out whichever of them fires.
        last = -1
        for n, merge in enumerate(bpe.get("merges", [])):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            i = bpe["vocab"].get(a + b)
            if i is None or i < last:
                raise InputError(f"{path}: merge {n} ({a!r} + {b!r}) gives id {i}, below the previous merge's {last}: "
                                 "token ids must not fall in merge order for tiktoken to reproduce this BPE")
            last = i
        if len(ranks) != len(bpe["vocab"]) or any(bytes([b]) not in ranks for b in range(256)):
            raise InputError(f"{path}: the vocab does not hold all 256 bytes once each; not a byte-level BPE")
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        self.enc = tiktoken.Encoding(name=os.path.basename(os.path.abspath(model_dir)), pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = max(list(ranks.values()) + list(specials.values())) + 1
        self.source = model_dir  # recorded in the checkpoints of models that use this tokenizer
        self.stop_tokens = self._stop_tokens(model_dir, specials)
        self.bos, eos = self._template(spec.get("post_processor"), path)
        self.eot = eos if eos is not None else self.stop_tokens[0]
        if self.eot not in self.stop_tokens:
            self.stop_tokens = [self.eot, *self.stop_tokens]
        self.pad = self.eot
        self.start_thought = self.end_thought = None  # Quiet-STaR adds them (quietstar.add_thought_tokens)

    @staticmethod
    def _normalizer(norm, path):
        if norm is None:
            return False
        kinds = [n["type"] for n in norm.get("normalizers", [norm])]
        if set(kinds) - {"NFC"}:
            raise InputError(f"{path}: normalizer {kinds} is not supported (only NFC or none)")
        return "NFC" in kinds

    @staticmethod
    def _pattern(pre, path):
        """One regex for the pre-tokenizer: Qwen2's Split, GPT-2's ByteLevel regex, or Digits then ByteLevel."""
        steps = pre.get("pretokenizers", [pre]) if pre else []
        kinds = [p["type"] for p in steps]
        if not steps or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
            raise InputError(f"{path}: pre-tokenizer {kinds} is not supported (it must end in ByteLevel without a "
                             "prefix space)")
        use_regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and use_regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and use_regex and steps[0].get("individual_digits"):
            return GPT2_DIGITS_PATTERN
        if kinds == ["Split", "ByteLevel"] and not use_regex and "Regex" in steps[0].get("pattern", {}) \
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return steps[0]["pattern"]["Regex"]
        raise InputError(f"{path}: pre-tokenizer {kinds} is not supported")

    @staticmethod
    def _template(post, path):
        """
        (BOS ids, EOS id or None) of the post_processor's single-sequence template: the special
        tokens before and after $A in a TemplateProcessing, alone or inside a Sequence. ByteLevel
        (offsets only) or none adds nothing.
        """
        steps = (post.get("processors", []) if post.get("type") == "Sequence" else [post]) if post else []
        bos, eos = [], []
        for step in steps:
            kind = step.get("type")
            if kind == "ByteLevel":
                continue
            if kind != "TemplateProcessing":
                raise InputError(f"{path}: post_processor {kind!r} is not supported (only "
                                 "TemplateProcessing, ByteLevel)")
            try:
                single, specials, side = step["single"], step.get("special_tokens", {}), bos
                for piece in single:
                    if "Sequence" in piece:
                        if piece["Sequence"]["id"] != "A" or side is eos:
                            raise InputError(f"{path}: post_processor template {single} is not one sequence")
                        side = eos
                    else:
                        side += specials[piece["SpecialToken"]["id"]]["ids"]
            except (KeyError, TypeError):
                raise InputError(f"{path}: post_processor template {step.get('single')!r} is malformed") from None
        if len(eos) > 1:
            raise InputError(f"{path}: post_processor ends a sequence with {len(eos)} tokens; only one is supported")
        return bos, (eos[0] if eos else None)

    @staticmethod
    def _stop_tokens(model_dir, specials):
        """The end-of-sequence ids of generation_config.json (base: <|endoftext|>, instruct: <|im_end|> too)."""
        gen = os.path.join(model_dir, "generation_config.json")
        ids = []
        if os.path.exists(gen):
            config = read_json(gen)
            eos = config.get("eos_token_id") if isinstance(config, dict) else "no JSON object"
            ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else [] if eos is None else None
            if ids is None or not all(isinstance(i, int) for i in ids):
                raise InputError(f"{gen}: eos_token_id must be an id or a list of ids, not {eos!r}")
        if not ids:
            ids = [specials[t] for t in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>") if t in specials][:1]
        if not ids:
            raise InputError(f"{model_dir}: no eos_token_id in generation_config.json and no known end token")
        return ids

    def _norm(self, text):
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def encode(self, text):
        """Encode untrusted text: special-token strings in it stay plain text."""
        return self.enc.encode(self._norm(text), disallowed_special=())

    def encode_with_specials(self, text):
        return self.enc.encode(self._norm(text), allowed_special="all")

    def encode_prompt(self, text):
        """The ids a sequence starts with: the BOS of the file's template (if any), then the untrusted text."""
        return self.bos + self.encode(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.enc.n_vocab])


# -----------------------------------------------------------------------------
# weights: Hugging Face model directories (config.json + safetensors)

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def read_safetensors(path):
    """
    {name: tensor} from one .safetensors file, read by hand: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian
    data. A truncated or corrupt file is a CheckpointError naming the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n} in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        body = bytearray(f.read())  # writable, so torch.frombuffer shares it without a warning
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name}: {info}") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
        nbytes = math.prod(shape) * dtype.itemsize
        if end > len(body) or end - start != nbytes or start < 0:
            raise CheckpointError(f"{path}: tensor {name} needs bytes {start}..{end} of {len(body)}: the file is "
                                  "truncated or corrupt")
        t = torch.frombuffer(body, dtype=dtype, count=math.prod(shape),
                             offset=start) if nbytes else torch.empty(0, dtype=dtype)
        out[name] = t.view(shape)
    return out


def read_hf_config(model_dir, block_size=0):
    """The GPTConfig of a Hugging Face model directory's config.json; every error names the file."""
    path = os.path.join(model_dir, "config.json")
    cfg = read_json(path, CheckpointError)
    try:
        return hf_config(cfg, block_size)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None


def hf_config(cfg, block_size=0):
    """A Hugging Face config.json (dict) -> GPTConfig, for the families nanostar's layout covers."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                              "(Llama 2/3.x, SmolLM2, Qwen2/2.5, Qwen3)")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise CheckpointError(f"{kind}: only a bias-free SiLU-gated MLP is supported")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{kind}: sliding-window attention is not supported")
    # transformers >= 5 writes rope_parameters; older files rope_theta/rope_scaling
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "default":
            scaling = None
        elif rtype != "llama3":
            raise CheckpointError(f"rope scaling of type {rtype!r} is not supported (only 'llama3')")
        else:
            scaling = {k: scaling[k]
                       for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            scaling["rope_type"] = "llama3"
    n_head = cfg["num_attention_heads"]
    max_pos = cfg.get("max_position_embeddings", 2048)
    return GPTConfig(
        block_size=min(block_size, max_pos) if block_size else max_pos,
        vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_head=n_head,
        n_kv_head=cfg.get("num_key_value_heads") or n_head, n_embd=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], rope_theta=float(theta), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        qk_norm=kind == "qwen3", rope_scaling=scaling,
    )


def load_pretrained(model_dir, device="cpu", block_size=0):
    """
    A GPT with the weights of a Hugging Face model directory (config.json and model.safetensors,
    or shards listed in model.safetensors.index.json). Every tensor in the files must fill a
    parameter and every parameter must be filled, shapes equal; a tied model may omit
    lm_head.weight. Weights are kept in fp32 (bf16 autocast does the GPU's work). block_size
    caps the context (the rotary table and caches), 0 = the model's max_position_embeddings.
    """
    config = read_hf_config(model_dir, block_size)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            files = sorted(set(read_json(index, CheckpointError)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: no weight_map of tensor names to files") from None
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(model_dir, name)))
    model = GPT(config)  # random weights, all replaced below
    state = {k.removeprefix("model."): v for k, v in tensors.items()}
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
        head = state.pop("lm_head.weight", None)
        if head is not None and "embed_tokens.weight" in state and not torch.equal(head, state["embed_tokens.weight"]):
            raise CheckpointError(f"{model_dir}: tie_word_embeddings is set but lm_head.weight differs from "
                                  "the embedding")
    missing, unused = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unused or wrong:
        raise CheckpointError(f"{model_dir}: weights do not match the {config.n_layer}-layer model: missing {missing}, "
                              f"unused {unused}, wrong shape "
                              f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not config.tie_embeddings)
    return model.to(device).eval()
