"""The compression plan: one versioned, hand-editable JSON file, the compiler's single input.

    {
      "schema": "litevar-plan", "version": 1,
      "model":  {"depth": 4, "width": 128, "heads": 2, "patch_nums": [1, 2, ...], "vocab_size": 1024},
      "calibration": {...how the numbers were measured (informational)...},
      "mdwa": {"threshold": 0.95,
               "windows": [[[[w, ...] per key scale ≤ q] per query scale q] per head] per block]},
      "asc":  {"mode": "map" | "output", "threshold": 0.95,
               "share": [[true/false per scale] per block]},
      "quant": {"default": "fp32", "attention_bits": null | 8,
                "layers": {"blocks.0.ffn.fc1": {"scheme": "w4a16", "group": 64}, ...}}
    }

A window is `null` (dense: every key of that scale), `0` (the key block is dropped) or a
positive integer w (keys j with |i·n_k/n_q − j| < w, i and j flattened indices). Every field is
checked on load; an error names the offending entry by its path in the file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import UserError
from compiler.fileio import atomic_path
from compiler.model.config import VARConfig

SCHEMA, VERSION = "litevar-plan", 1
ASC_MODES = ("map", "output")
QUANT_SCHEMES = ("fp32", "fp16", "w8a8", "w4a16", "w4a8")
GROUP_SIZES = (32, 64, 128)


@dataclass
class Plan:
    model: dict
    windows: list | None = None          # [block][head][q scale][k scale] → None | 0 | w
    mdwa_threshold: float | None = None
    asc_share: list | None = None        # [block][scale] → bool
    asc_mode: str = "map"
    asc_threshold: float | None = None
    quant_default: str = "fp32"
    quant_layers: dict = field(default_factory=dict)  # layer name → {"scheme": s, "group": g}
    attention_bits: int | None = None    # 8: Q, K, V and the attention map at 8 bits
    calibration: dict = field(default_factory=dict)

    @staticmethod
    def empty(cfg: VARConfig) -> "Plan":
        return Plan(model=model_signature(cfg))

    def layer_scheme(self, name: str) -> tuple[str, int | None]:
        entry = self.quant_layers.get(name)
        if entry is None:
            return self.quant_default, None
        return entry["scheme"], entry.get("group")

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA, "version": VERSION, "model": self.model, "calibration": self.calibration,
            "mdwa": None if self.windows is None else {"threshold": self.mdwa_threshold, "windows": self.windows},
            "asc": None if self.asc_share is None else {"mode": self.asc_mode, "threshold": self.asc_threshold,
                                                        "share": self.asc_share},
            "quant": {"default": self.quant_default, "layers": self.quant_layers,
                      "attention_bits": self.attention_bits},
        }

    def save(self, path):
        with atomic_path(path) as tmp:
            tmp.write_text(_dump(self.to_json()) + "\n")


def _dump(obj) -> str:
    """JSON with the innermost lists on one line, so the windows stay readable and editable."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return re.sub(r"\{\s+([^\[\]{}]*?)\s+\}", lambda m: "{" + " ".join(m.group(1).split()) + "}", text)


def model_signature(cfg: VARConfig) -> dict:
    return {"depth": cfg.depth, "width": cfg.width, "heads": cfg.heads,
            "patch_nums": list(cfg.patch_nums), "vocab_size": cfg.vocab_size}


def load_plan(path, cfg: VARConfig | None = None) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such plan file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return parse_plan(raw, str(path), cfg)


def parse_plan(raw, where: str, cfg: VARConfig | None = None) -> Plan:
    def bad(at, msg):
        raise UserError(f"{where}: {at}: {msg}")

    if not isinstance(raw, dict):
        bad("(top level)", "expected a JSON object")
    if raw.get("schema") != SCHEMA:
        bad("schema", f"expected '{SCHEMA}', got {raw.get('schema')!r}")
    if raw.get("version") != VERSION:
        bad("version", f"this tool reads version {VERSION}, got {raw.get('version')!r}")
    model = raw.get("model")
    if not isinstance(model, dict) or not all(k in model for k in ("depth", "heads", "patch_nums")):
        bad("model", "expected an object with depth, heads and patch_nums")
    if cfg is not None:
        want = model_signature(cfg)
        for k, v in want.items():
            if model.get(k) != v:
                bad(f"model.{k}", f"the plan was made for {k} = {model.get(k)}, this model has {v}; "
                                  "calibrate a plan for this model")
    depth, heads, pns = model["depth"], model["heads"], model["patch_nums"]
    plan = Plan(model=model, calibration=raw.get("calibration") or {})

    mdwa = raw.get("mdwa")
    if mdwa is not None:
        windows = mdwa.get("windows") if isinstance(mdwa, dict) else None
        _check_nested(windows, "mdwa.windows", [depth, heads, len(pns)], bad)
        for b, per_head in enumerate(windows):
            for h, per_q in enumerate(per_head):
                for q, per_k in enumerate(per_q):
                    at = f"mdwa.windows[{b}][{h}][{q}]"
                    if not isinstance(per_k, list) or len(per_k) != q + 1:
                        bad(at, f"expected a list of {q + 1} windows (key scales 0..{q})")
                    for k, w in enumerate(per_k):
                        if not (w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0)):
                            bad(f"{at}[{k}]", f"a window is null (dense), 0 (dropped) or a positive integer, got {w!r}")
                    if per_k[q] == 0:
                        bad(f"{at}[{q}]", "a query scale cannot drop its own scale's keys")
        plan.windows, plan.mdwa_threshold = windows, mdwa.get("threshold")

    asc = raw.get("asc")
    if asc is not None:
        if not isinstance(asc, dict) or asc.get("mode") not in ASC_MODES:
            bad("asc.mode", f"expected one of {ASC_MODES}, got {asc.get('mode') if isinstance(asc, dict) else asc!r}")
        _check_nested(asc.get("share"), "asc.share", [depth, len(pns)], bad)
        for b, row in enumerate(asc["share"]):
            for s, v in enumerate(row):
                if not isinstance(v, bool):
                    bad(f"asc.share[{b}][{s}]", f"expected true or false, got {v!r}")
        plan.asc_share, plan.asc_mode, plan.asc_threshold = asc["share"], asc["mode"], asc.get("threshold")

    quant = raw.get("quant") or {"default": "fp32", "layers": {}}
    if quant.get("default", "fp32") not in QUANT_SCHEMES:
        bad("quant.default", f"expected one of {QUANT_SCHEMES}, got {quant.get('default')!r}")
    plan.quant_default = quant.get("default", "fp32")
    layers = quant.get("layers") or {}
    if not isinstance(layers, dict):
        bad("quant.layers", "expected an object mapping layer names to {scheme, group}")
    for name, entry in layers.items():
        at = f"quant.layers.{name}"
        if not isinstance(entry, dict) or entry.get("scheme") not in QUANT_SCHEMES:
            bad(at, f"expected {{\"scheme\": one of {QUANT_SCHEMES}, ...}}, got {entry!r}")
        if entry["scheme"].startswith("w4") and entry.get("group") not in GROUP_SIZES:
            bad(f"{at}.group", f"int4 weights need a group size in {GROUP_SIZES}, got {entry.get('group')!r}")
        if cfg is not None and not _layer_exists(name, cfg):
            bad(at, "no such linear layer in this model")
    plan.quant_layers = layers
    if quant.get("attention_bits") not in (None, 8):
        bad("quant.attention_bits", f"null or 8, got {quant.get('attention_bits')!r}")
    plan.attention_bits = quant.get("attention_bits")
    return plan


def _check_nested(value, at, dims, bad):
    """`value` is a list of dims[0] lists of dims[1] ... (only the outer len(dims) levels)."""
    def walk(v, level, path):
        if level == len(dims):
            return
        if not isinstance(v, list) or len(v) != dims[level]:
            bad(path, f"expected a list of {dims[level]} entries, got "
                      f"{len(v) if isinstance(v, list) else type(v).__name__}")
        for i, item in enumerate(v):
            walk(item, level + 1, f"{path}[{i}]")

    walk(value, 0, at)


def linear_layer_names(cfg: VARConfig) -> list[str]:
    """Every Linear of the transformer that a plan can quantize."""
    names = ["word_embed", "head", "head_nm.ada_lin.1"]  # d36's shared_ada_lin stays float
    for b in range(cfg.depth):
        names += [f"blocks.{b}.attn.mat_qkv", f"blocks.{b}.attn.proj", f"blocks.{b}.ffn.fc1", f"blocks.{b}.ffn.fc2"]
        if not cfg.shared_aln:
            names.append(f"blocks.{b}.ada_lin.1")
    return names


def _layer_exists(name: str, cfg: VARConfig) -> bool:
    return name in set(linear_layer_names(cfg))
