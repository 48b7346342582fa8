"""A model on disk and back: checkpoint.pt, the state a run resumes from, and model.pt, the model
final.json describes (the one a user keeps). Both are written atomically and hold tensors and plain
containers only, so they load through torch's safe loader (runs.load_checkpoint); a trie is rebuilt
from its saved structure (JulietNet.from_structure) before its weights load.

    save_checkpoint(out, model, state, progress, args)   checkpoint.pt: model and resume state
    save_model(out, model, epoch) / load_model(run_dir)  model.pt
    load_run(run_dir)                                    (config, model): model.pt or checkpoint.pt
"""

import os

import torch

import runs
from backbones import make_backbone, static_model
from trie import JulietNet


def _weights(model) -> dict:
    """The model's weights and its trie structure (None for a static backbone)."""
    return {"model": model.state_dict(),
            "structure": model.structure() if isinstance(model, JulietNet) else None}


def save_checkpoint(out: str, model, state: dict, progress: dict, args) -> None:
    """Model, optimizer, scheduler, GradScaler, progress, args, RNG state and the trie structure,
    atomically: tensors and plain containers only, so that it loads with weights_only=True."""
    ckpt = {**_weights(model), "optimizer": state["optimizer"].state_dict(),
            "scheduler": state["scheduler"].state_dict(), "scaler": state["scaler"].state_dict(),
            "run": progress, "args": vars(args), "rng": runs.rng_state()}
    runs.atomic_write(os.path.join(out, "checkpoint.pt"), lambda f: torch.save(ckpt, f))


def save_model(out: str, model, epoch: int) -> None:
    """model.pt, atomically: the weights and trie structure that final.json describes (the
    checkpoint a user keeps; checkpoint.pt is the resume state)."""
    ckpt = {**_weights(model), "epoch": epoch}
    runs.atomic_write(os.path.join(out, "model.pt"), lambda f: torch.save(ckpt, f))


def load_model(run_dir: str, device="cpu"):
    """The model of a run's model.pt (safe loader; its trie rebuilt first)."""
    ckpt = runs.load_checkpoint(os.path.join(run_dir, "model.pt"), device)
    source = ckpt["structure"] or runs.read_config(run_dir)  # both name backbone and num_classes
    return model_from_checkpoint(ckpt, source["backbone"], source["num_classes"]).to(device)


def model_from_checkpoint(ckpt: dict, backbone: str, num_classes: int):
    """The checkpoint's model: the trie rebuilt from its structure first (or the static backbone),
    then its weights."""
    s = ckpt["structure"]
    try:
        if s is None:
            model = static_model(backbone, num_classes)
        else:
            model = JulietNet.from_structure(s, make_backbone(s["backbone"], s["num_classes"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        where = ckpt.get("loaded_from", ["the checkpoint"])[0]
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise runs.UsageError(f"{where}: its structure and weights do not make a model "
                              f"({type(e).__name__}: {detail})") from None
    return model


def load_run(run_dir: str, device="cpu"):
    """(config, model in eval mode) of a run directory, for measurement: its model.pt, else its
    checkpoint.pt."""
    if not os.path.isdir(run_dir):
        raise runs.UsageError(f"{run_dir}: no such run directory")
    config = runs.read_config(run_dir)
    # model.pt: the kept (and calibrated) model that final.json describes; a trie's checkpoint
    # names its own backbone, a static one is the config's
    name = "model.pt" if os.path.exists(os.path.join(run_dir, "model.pt")) else "checkpoint.pt"
    ckpt = runs.load_checkpoint(os.path.join(run_dir, name), device)
    model = model_from_checkpoint(ckpt, config["backbone"], config["num_classes"])
    return config, model.to(device).eval()
