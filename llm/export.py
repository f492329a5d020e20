"""Training checkpoint -> Hugging Face model directory (weights as safetensors, config, tokenizer).

    python -m llm.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--overwrite]

Vanilla runs become a plain `LlamaForCausalLM` directory that needs no code of ours; ParameterNet runs carry
`auto_map` and their self-contained code files (load with `trust_remote_code=True`). Every checkpoint our trainer
writes holds the full weights gathered into `model.safetensors` (ZeRO-3 and expert-parallel runs included), so
export reads no optimizer state and never unpickles anything.

OUT_DIR must not exist yet (or be empty). An earlier export there (it holds `parameternet_export.json`, which lists
its files) is replaced only with --overwrite; a directory with anything else in it, and a run or its checkpoints,
never (runtime.fsutil.claim_output).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.errors import print_error


def find_checkpoint(path: str | Path) -> Path:
    """A run directory (newest complete checkpoint), its checkpoints/ directory, or one checkpoint directory."""
    from runtime.checkpoint import MANIFEST, complete_checkpoints

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    if (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{path}: no complete checkpoint (a directory iter_NNNNNNN with {MANIFEST}) found")


EXPORT_META = "parameternet_export.json"  # proves the directory is ours; names the checkpoint and its iteration
TOOL = "llm.export"


def claim_export_dir(out_dir: str | Path, overwrite: bool, flag: str = "OUT_DIR") -> bool:
    """Refuse an output directory that export must not replace (see runtime.fsutil.claim_output)."""
    from runtime.fsutil import claim_output

    return claim_output(out_dir, overwrite=overwrite, flag=flag, tool=TOOL, proof=EXPORT_META)


def write_hf_directory(
    model_config,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: str | Path | None,
    out_dir: str | Path,
    *,
    overwrite: bool = True,
    iteration: int | None = None,
    source: str | Path | None = None,
) -> Path:
    """Build the HF model from `model_config`, load `state_dict` strictly, save with its tokenizer. Written to a
    temporary directory and renamed, so an existing good export is replaced only by a complete one.

    `overwrite=True` (what the trainer's RUN/hf needs on every publication) still replaces only an earlier export;
    anything else at `out_dir` is refused before any work."""
    import llm.model  # noqa: F401  (registers ParameterNet for save_pretrained's auto_map)
    from llm.model import build_model
    from runtime.fsutil import publish_dir, temp_dir_for, write_owner

    out_dir = Path(out_dir)
    claim_export_dir(out_dir, overwrite)
    with torch.device("meta"):
        model = build_model(model_config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.config.use_cache = True
    tmp = temp_dir_for(out_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:
            from llm.data import load_tokenizer

            load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        meta = {"iteration": iteration, "checkpoint": None if source is None else str(Path(source).resolve())}
        write_owner(tmp, TOOL, EXPORT_META, meta)
        publish_dir(tmp, out_dir)  # also gives every file the umask's mode (save_pretrained's weights are 0600)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Export the newest complete checkpoint of `checkpoint` to `out_dir`; `overwrite` replaces an earlier export."""
    from llm.model.presets import config_from_dict, load_model_config

    claim_export_dir(out_dir, overwrite)  # before reading gigabytes of weights
    ckpt = find_checkpoint(checkpoint)
    manifest = json.loads((ckpt / "complete.json").read_text())
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{ckpt}: model.safetensors is missing (not a checkpoint written by llm.pretrain)")
    config = manifest["config"]
    if "model_config" in manifest:
        model_config = config_from_dict(manifest["model_config"], f"{ckpt}/complete.json")
    else:
        model_config = load_model_config(config["model"], **config.get("model_overrides", {}))
    tokenizer_dir = tokenizer_dir or manifest.get("tokenizer_dir") or config.get("tokenizer")
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(
            f"{ckpt}: its tokenizer directory {tokenizer_dir!r} does not exist; pass --tokenizer DIR"
        )
    return write_hf_directory(
        model_config,
        load_file(str(weights)),
        tokenizer_dir,
        out_dir,
        overwrite=overwrite,
        iteration=manifest.get("iteration"),
        source=ckpt,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one iter_NNNNNNN directory")
    parser.add_argument("out_dir", help="a directory that does not exist yet (or is empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier export (never anything else)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run used)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print_error(str(err))
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
