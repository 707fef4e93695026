"""Compare the converted Whisper tiny.en with CTranslate2 on pocketsphinx-testdata speech.

Prints, per recording, the encoder's relative error against CTranslate2's own encoder on the same
log-mel features, the greedy transcriptions of both, and the word error rate against the shipped
transcript. Needs the dev extra (ctranslate2) and Debian's pocketsphinx-testdata::

    .venv/bin/python scripts/check_whisper_conversion.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from mllm_missing.metrics import normalise_transcript, word_errors

DATA = Path("/usr/share/pocketsphinx/test/data")
SETS = {"librivox": "transcription", "cards": "cards.transcription"}


def references() -> dict[Path, list[str]]:
    """Recording path -> reference words, for every set whose files are present."""
    refs = {}
    for folder, name in SETS.items():
        listing = DATA / folder / name
        if not listing.is_file():
            continue
        for line in listing.read_text().splitlines():
            match = re.match(r"<s>(.*)</s>\s*\((.*)\)", line.strip())
            if match:
                refs[DATA / folder / f"{match.group(2)}.wav"] = match.group(1).split()
    return refs


def main() -> None:
    """Run the comparison and print one line per recording, then the totals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="cache root for the converted model")
    args = parser.parse_args()

    import ctranslate2
    import torch

    from mllm_missing.backbones.audio import load_audio, transcribe
    from mllm_missing.backbones.whisper_ct2 import (
        default_ct2_whisper_dir,
        load_ct2_whisper,
        load_ct2_whisper_processor,
    )

    refs = references()
    if not refs:
        raise SystemExit(f"no recordings under {DATA}: apt-get install pocketsphinx-testdata")
    start = time.perf_counter()
    model = load_ct2_whisper(cache_dir=args.cache_dir)
    processor = load_ct2_whisper_processor(cache_dir=args.cache_dir)
    print(f"converted/loaded model in {time.perf_counter() - start:.1f} s")
    original = ctranslate2.models.Whisper(
        str(default_ct2_whisper_dir()), device="cpu", compute_type="float32"
    )
    prompt = processor.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    totals = {"errors": 0, "words": 0, "same": 0, "worst_fro": 0.0, "worst_max": 0.0}
    for path, ref in refs.items():
        waveform = load_audio(path)
        features = processor.feature_extractor(
            waveform.numpy(), sampling_rate=16000, return_tensors="np"
        ).input_features
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
        with torch.inference_mode():
            ours = model.get_encoder()(torch.from_numpy(features)).last_hidden_state.numpy()
        theirs = np.asarray(original.encode(view, to_cpu=True))
        fro = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
        peak = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        text = transcribe(model, processor, [waveform])[0]
        ids = original.generate(view, [prompt], beam_size=1)[0].sequences_ids[0]
        ct2_text = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        errors = word_errors(ref, normalise_transcript(text))
        totals["errors"] += errors
        totals["words"] += len(ref)
        totals["same"] += text == ct2_text
        totals["worst_fro"] = max(totals["worst_fro"], fro)
        totals["worst_max"] = max(totals["worst_max"], peak)
        print(
            f"{path.parent.name}/{path.stem}: rel_fro={fro:.2e} rel_max={peak:.2e} "
            f"errors={errors}/{len(ref)} same_as_ct2={text == ct2_text}\n"
            f"  ref: {' '.join(ref)}\n  ours: {text}\n  ct2:  {ct2_text}"
        )
    print(
        f"worst encoder error: ||a-b||/||b|| = {totals['worst_fro']:.2e}, "
        f"max|a-b|/max|b| = {totals['worst_max']:.2e}; "
        f"WER {totals['errors']}/{totals['words']} = {totals['errors'] / totals['words']:.3f}; "
        f"transcripts identical to CTranslate2: {totals['same']}/{len(refs)}"
    )


if __name__ == "__main__":
    main()
