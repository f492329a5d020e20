"""Weight files of a vision run, and starting a run from a previous stage's weights.

    RUN/model.safetensors       the final weights (fp32), what `--init_from RUN` of the fine-tuning stage reads
    RUN/model_ema.safetensors   the final EMA weights, when EMA is on (`--init_from_ema true` reads them)

Training checkpoints are runtime.checkpoint's (RUN/checkpoints/iter_NNNNNNN/); these files are what outlives the run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime import fsutil

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """fp32 safetensors, written to a temporary name and renamed."""
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()
    }
    fsutil.save_safetensors_atomic(tensors, path, metadata=metadata)


def resolve_init_weights(init_from: str, use_ema: bool) -> Path:
    """The weight file `init_from` names: a run directory's (EMA) weights, or a .safetensors file."""
    path = Path(init_from)
    if path.is_dir():
        name = EMA_WEIGHTS if use_ema else WEIGHTS
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"init_from={init_from!r}: {path / name} is missing; the run did not finish (resume it first), "
                f"or {'EMA was off in that run (drop --init_from_ema)' if use_ema else 'give the .safetensors path'}"
            )
        return path / name
    if not path.is_file():
        raise FileNotFoundError(f"init_from={init_from!r} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"init_from={init_from!r}: expected a .safetensors file or a run directory")
    return path


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def load_init_weights(model: torch.nn.Module, path: Path, keep_classifier: bool = False) -> list[str]:
    """Load a previous stage's weights into `model`; return the names of the tensors left freshly initialised.

    The classifier starts fresh (a new label set) unless `keep_classifier`. Any other missing, unexpected or
    mis-shaped tensor is an error: it would mean another architecture, not another label set.
    """
    state = load_file(str(path))
    own = model.state_dict()
    heads = classifier_prefixes(model)
    reinit = [] if keep_classifier else [k for k in own if k.startswith(heads)]
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    missing = sorted(set(own) - set(state) - set(reinit))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        detail = "; ".join(
            f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
            for label, names in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
            if names
        )
        hint = " (keep_classifier needs the same num_classes)" if keep_classifier else ""
        raise ValueError(
            f"init_from={str(path)!r} does not fit model {type(model).__name__} ({detail}); fine-tune the same model "
            f"name, num_experts and in_chans as the run that produced it{hint}"
        )
    model.load_state_dict(state, strict=False)
    return reinit
