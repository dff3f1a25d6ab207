"""The Inference cell: load the best checkpoint's weights safely and generate a sample from a prompt."""

from __future__ import annotations

from typing import Any

from ._namespace import check, show_path, text_output

SAMPLE_START = "----- sample -----"
SAMPLE_END = "----- end of sample -----"


@text_output
def run(ns: dict[str, Any], prompt: str = "def ", max_new_tokens: int = 200, seed: int = 0) -> None:
    from ..analysis import generate_text, load_model
    from ..config import ConfigError
    from ..engine.commit import CheckpointCorrupt

    if not check(ns, ["results"], cell="Inference"):
        return
    results = ns["results"]
    path = ns.get("best_checkpoint_path") or results.get("best_checkpoint_path") or results.get("checkpoint_path")
    if not path:
        print("❌ The results name no checkpoint. Next: run the Recovery cell to read the run from disk.")
        return
    try:
        max_new_tokens = int(max_new_tokens)
        if not 1 <= max_new_tokens <= 10_000:
            raise ValueError
    except (TypeError, ValueError):
        print(f"❌ max_new_tokens={max_new_tokens!r} must be a whole number from 1 to 10000; fix it and re-run.")
        return
    try:
        model = load_model(path)
    except (CheckpointCorrupt, ConfigError, OSError, RuntimeError) as exc:
        print(f"❌ Could not load {show_path(path)}: {exc}")
        print("Next: run the Recovery cell again: it finds the newest checkpoint that is intact.")
        return
    ns["best_model"] = model
    print(f"✅ Loaded {model.num_parameters():,} parameters from {show_path(path)} (hashes verified, safetensors).")
    text = generate_text(model, prompt, max_new_tokens, seed)
    print(f"Prompt {prompt!r}, {max_new_tokens} new bytes, seed {seed}:")
    print(SAMPLE_START)
    print(text)
    print(SAMPLE_END)
