"""
LoRA as LaVi-Bridge uses it (cloneofsimo/lora, lora_diffusion/lora.py): explicit wrappers around a
frozen nn.Linear / nn.Conv2d, injection by module-path regexes, merge for inference, safetensors I/O
of the LoRA weights only, and import of the release's flat lora_vis.pt / lora_text.pt.

    paths = inject(unet, LORA_TARGETS["unet"], rank=32)      # names of the wrapped layers, in order
    import_release_list(unet, load_release_file("lora_vis.pt"), paths)
    merge_lora(unet)                                         # fold scale * up @ down into the base
"""
import os
import re
from types import SimpleNamespace

import torch
import torch.nn as nn

from model_io import BadInput, MissingInput, check_state_dict, load_weights, save_safetensors

# -----------------------------------------------------------------------------
# the wrappers


class _LoRA(nn.Module):
    """What both wrappers share: y = base(x) + scale * dropout(up(down(x))), dropout on the branch OUTPUT as
    in the release; down ~ N(0, 1/r) and up = 0 at init (cloneofsimo); merge() folds scale * up @ down into
    the frozen base weight (idempotent), unmerge() takes it out again."""

    def _init_branch(self, base, rank, scale, dropout):
        if rank < 1:
            raise BadInput(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)
        self.rank, self.scale, self.merged = rank, scale, False

    @classmethod
    def from_base(cls, base, rank, scale=1.0, dropout=0.0):
        return cls(base, rank, scale, dropout)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        lora = self.dropout(self.up(self.down(x.to(self.down.weight.dtype))))
        return y + self.scale * lora.to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class LoRALinear(_LoRA):
    """LoRA around a frozen nn.Linear (cloneofsimo/lora LoraInjectedLinear); x (..., in) -> (..., out)."""

    def __init__(self, base, rank, scale=1.0, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Linear(base.in_features, rank, **kw)
        self.up = nn.Linear(rank, base.out_features, **kw)
        self._init_branch(base, rank, scale, dropout)

    def delta_weight(self):
        """scale * up @ down in float32: (out, in)."""
        return self.scale * (self.up.weight.float() @ self.down.weight.float())


class LoRAConv2d(_LoRA):
    """LoRA around a frozen nn.Conv2d: down has the base's kernel, stride, padding and dilation, up is 1x1
    (cloneofsimo/lora LoraInjectedConv2d); x (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, base, rank, scale=1.0, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise BadInput(f"LoRAConv2d supports groups=1 only (got groups={base.groups}); "
                           "grouped convs cannot be merged exactly")
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                              base.dilation, padding_mode=base.padding_mode, **kw)
        self.up = nn.Conv2d(rank, base.out_channels, 1, **kw)
        self._init_branch(base, rank, scale, dropout)

    def delta_weight(self):
        """scale * up @ down over the rank, in float32: (out, in, kh, kw). Exact, because a 1x1 stride-1
        conv after a kxk conv is the kxk conv with the mixed weight (bias-free, same padding)."""
        up = self.up.weight.float()[:, :, 0, 0]  # (out, r)
        return self.scale * torch.einsum("or,rihw->oihw", up, self.down.weight.float())


LORA_CLASSES = (LoRALinear, LoRAConv2d)

# -----------------------------------------------------------------------------
# injection by module path

# Regexes, matched with re.search against the dotted paths of model.named_modules() (paths relative
# to the module you pass); only nn.Linear / nn.Conv2d are wrapped. Each set hits exactly the layers
# that the LaVi-Bridge release walk hits (its target classes' Linear/Conv2d layers), in the same order.
_BLOCKS = r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
LORA_TARGETS = {
    # SD / LDM U-Net: ResnetBlock2D, Attention, GEGLU inside down/mid/up blocks. Anchored at the
    # U-Net root, so conv_in, time_embedding, proj_in/out, samplers and any VAE path never match.
    "unet": [_BLOCKS + r"\.resnets\.\d+\.(conv1|time_emb_proj|conv2|conv_shortcut)$",
             _BLOCKS + r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
             _BLOCKS + r"\.attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.0\.proj$"],
    # PixArt DiT: attention only (its FF is a plain GELU MLP)
    "dit": [r"^transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"],
    # language models: any prefix (T5EncoderModel "encoder.", LlamaForCausalLM "model.", ...)
    "t5": [r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)$"],
    "llama": [r"(^|\.)layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"],
    "bert": [r"(^|\.)layer\.\d+\.attention\.self\.(query|key|value)$",
             r"(^|\.)layer\.\d+\.attention\.output\.dense$"],
    "clip": [r"(^|\.)layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"],
}


def lora_modules(model):
    """[(path, LoRA module)] in named_modules (registration) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LORA_CLASSES)]


def inject(model, targets, rank, scale=1.0, dropout=0.0):
    """Wrap every nn.Linear / nn.Conv2d whose path matches one of `targets` (regexes, re.search on the
    named_modules path; or a LORA_TARGETS key) in place. Returns the wrapped paths in named_modules
    (registration) order: the order of the release's flat lists. Base weights are frozen."""
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise BadInput(f"unknown LoRA target set {targets!r}; choose from {sorted(LORA_TARGETS)}")
        targets = LORA_TARGETS[targets]
    patterns = [re.compile(t) for t in targets]
    paths, inside, layers = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, LORA_CLASSES):
            inside.append(name + ".")
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or any(name.startswith(p) for p in inside):
            continue
        layers.append(name)
        if any(p.search(name) for p in patterns):
            paths.append(name)
    if not paths:
        hint = "the model already has LoRA on them; " if inside else ""
        raise BadInput(f"no nn.Linear/nn.Conv2d path matched {targets} ({hint}paths are relative to the "
                       f"module passed, e.g. {layers[:4]})")
    for name in paths:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        wrap = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear
        setattr(parent, leaf, wrap.from_base(base, rank, scale, dropout))
    return paths


def unwrap_lora(model):
    """Fold every LoRA into its base layer and put the plain layer back in the wrapper's place, which restores
    the model's original state-dict keys (sampling: no wrapper call per layer). Returns the unwrapped
    paths."""
    paths = []
    for name, m in lora_modules(model):
        m.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, m.base)
        paths.append(name)
    return paths


def merge_lora(model):
    """Fold every LoRA branch into its base weight (inference). Returns how many were merged."""
    mods = lora_modules(model)
    for _, m in mods:
        m.merge()
    return len(mods)


def lora_parameters(model):
    """The trainable LoRA tensors, [down, up] per module, in module order."""
    return [p for _, m in lora_modules(model) for p in (m.down.weight, m.up.weight)]


# -----------------------------------------------------------------------------
# our own format: safetensors {path.down.weight, path.up.weight}


def lora_state_dict(model):
    """{path + ".down.weight": t, path + ".up.weight": t} over all LoRA modules (detached, not copied)."""
    sd = {}
    for name, m in lora_modules(model):
        sd[name + ".down.weight"] = m.down.weight.detach()
        sd[name + ".up.weight"] = m.up.weight.detach()
    return sd


def save_lora(model, path, metadata=None):
    """Write lora_state_dict(model) as safetensors (metadata: optional {str: str})."""
    sd = lora_state_dict(model)
    if not sd:
        raise BadInput("the model has no LoRA modules to save (call inject first)")
    save_safetensors(sd, path, metadata)


@torch.no_grad()
def _set_lora(m, down, up):
    """Copy (or, on the meta device, assign) down/up into one LoRA module, keeping a merge consistent."""
    merged = m.merged
    m.unmerge()
    for layer, t in ((m.down, down), (m.up, up)):
        if layer.weight.is_meta:
            layer.weight = nn.Parameter(t.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.weight.copy_(t)
    if merged:
        m.merge()


def load_lora(model, sd):
    """Load a {path.down.weight, path.up.weight} dict (or a file path) strictly: the same paths and shapes
    as the model's injected LoRA modules, else one ValueError naming missing / unexpected / mis-shaped."""
    if isinstance(sd, (str, os.PathLike)):
        sd = load_weights(str(sd))
    want = lora_state_dict(model)
    check_state_dict(SimpleNamespace(state_dict=lambda: want), sd, "LoRA")  # duck-typed: only .state_dict()
    for name, m in lora_modules(model):
        _set_lora(m, sd[name + ".down.weight"], sd[name + ".up.weight"])


# -----------------------------------------------------------------------------
# the LaVi-Bridge release format: a flat list [up_0, down_0, up_1, down_1, ...] (fp16)


def load_release_file(path):
    """Read a release lora_vis.pt / lora_text.pt (a pickled list of tensors) with weights_only=True."""
    if not os.path.isfile(path):
        raise MissingInput(f"LoRA file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"cannot read {path} as a torch file of tensors (truncated or corrupt?): {e}") from e
    if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise BadInput(f"{path}: expected a flat list [up_0, down_0, up_1, down_1, ...] of tensors "
                       f"(LaVi-Bridge / cloneofsimo format), got {type(obj).__name__}")
    if len(obj) % 2:
        raise BadInput(f"{path}: a release LoRA list holds (up, down) pairs, but it has {len(obj)} tensors")
    return [t.detach() for t in obj]


def import_release_list(model, tensors, injected_paths=None):
    """Load a release list into the injected LoRA modules: item i goes to path i // 2 (up first, then
    down). injected_paths: what inject returned (default: all LoRA modules in named_modules order,
    which is the release's module-walk order because our models keep diffusers' registration order).
    Everything is checked before anything is written."""
    mods = dict(lora_modules(model))
    paths = list(mods) if injected_paths is None else list(injected_paths)
    unknown = [p for p in paths if p not in mods]
    if unknown:
        raise BadInput(f"not LoRA modules in this model (inject first): {unknown[:5]}")
    if len(tensors) != 2 * len(paths):
        raise BadInput(f"release LoRA list has {len(tensors)} tensors ({len(tensors) / 2:g} pairs), "
                       f"but this model has {len(paths)} injected LoRA modules: "
                       f"expected {len(paths)} pairs "
                       f"({2 * len(paths)} tensors). Wrong target set or wrong model?")
    for i, p in enumerate(paths):
        m = mods[p]
        up, down = tensors[2 * i], tensors[2 * i + 1]
        for what, t, w in (("up", up, m.up.weight), ("down", down, m.down.weight)):
            if tuple(t.shape) != tuple(w.shape):
                file_rank = up.shape[1] if up.dim() > 1 else "?"
                raise BadInput(f"release LoRA item {2 * i + (what == 'down')} ({what} of {p}): shape "
                               f"{tuple(t.shape)} in the file, {tuple(w.shape)} in the model (file rank "
                               f"{file_rank}, injected rank {m.rank})")
    for i, p in enumerate(paths):
        _set_lora(mods[p], tensors[2 * i + 1], tensors[2 * i])


def export_release_list(model, injected_paths=None, dtype=torch.float16):
    """The inverse: [up_0, down_0, ...] on the CPU in `dtype` (the release stores fp16), for torch.save."""
    mods = dict(lora_modules(model))
    paths = list(mods) if injected_paths is None else list(injected_paths)
    out = []
    for p in paths:
        out += [mods[p].up.weight.detach().to("cpu", dtype), mods[p].down.weight.detach().to("cpu", dtype)]
    return out
