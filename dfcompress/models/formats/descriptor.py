"""Model output folders (``OUT/dfcompress.json``): pick the best file they hold, keep their metadata.

Preference: state_dict + arch (exact eager model, BN layers intact), then .pt2 (exact, hookable via
FX), then ONNX (may be BN-folded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..model_dir import DESCRIPTOR

PREFERENCE = ("state_dict", "pt2", "onnx")


def read_descriptor(folder: Path) -> dict[str, Any]:
    path = folder / DESCRIPTOR
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({exc}); re-run the command that wrote {folder}") from None
    if not isinstance(desc, dict) or desc.get("kind") != "model":
        raise UserError(f"{path} does not describe a model (expected \"kind\": \"model\"); pass a model folder or file")
    if not isinstance(desc.get("files"), dict):
        raise UserError(f"{path} lists no model files (\"files\" is missing); re-run the command that wrote {folder}")
    return desc


def pick_model_file(folder: Path, desc: dict[str, Any], arch: str | None) -> tuple[str, Path]:
    """(kind, path) of the preferred existing file; state_dict only counts when an arch is known."""
    files = desc["files"]
    arch = arch or desc.get("arch")
    root = folder.resolve()
    listed = []
    needs_arch = False
    for kind in PREFERENCE:
        name = files.get(kind)
        if not isinstance(name, str) or not name:
            continue
        path = (folder / name).resolve()
        if root not in path.parents:
            raise UserError(f"{folder / DESCRIPTOR} points outside its folder ({name}); refusing to follow it")
        listed.append(name)
        if not path.is_file():
            continue
        if kind == "state_dict" and not arch:
            needs_arch = True
            continue
        return kind, path
    if needs_arch:
        raise UserError(f"{folder} holds only a state_dict and its {DESCRIPTOR} names no architecture: pass --arch NAME")
    if not listed:
        raise UserError(f"{folder / DESCRIPTOR} lists no state_dict, pt2 or onnx file; re-run the command that wrote {folder}")
    raise UserError(f"none of the files listed in {folder / DESCRIPTOR} exist ({', '.join(listed)}); the folder is incomplete")
