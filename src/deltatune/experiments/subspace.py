"""What a LoRA update does to the weights (Hu et al. 2021, section 7).

**Subspace similarity.** For two adapters' A matrices of one layer (A is r x in), take the
right singular vectors U (of A1) and V (of A2), ordered by singular value, and

    phi(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j)

with U_i the top-i columns. phi is 1 when one subspace contains the other and 0 when they are
orthogonal (a normalised Grassmann similarity).

**Amplification.** For dW = scaling * B A of rank r and the base weight W: with U, V the top-r
left / right singular vectors of dW, ``||U^T W V||_F`` measures how much of W lies in dW's
directions; compared with ``||dW||_F`` (the factor ``||dW||_F / ||U^T W V||_F`` is how strongly
dW amplifies those directions), with r random orthonormal directions, and with W's own top-r
directions (``sqrt(sum of W's top-r squared singular values)``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from deltatune.core.state import KEY_PREFIX
from deltatune.errors import AdapterFileError, ConfigError

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


# --- the math --------------------------------------------------------------------------------

def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of ``a`` (r x in) as columns (in x r), by singular value."""
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh.T


def similarity(a1: torch.Tensor, a2: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """phi(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j) (defaults: i, j = the ranks)."""
    i, j = _checked_ij(a1, a2, i, j)
    return _phi(right_singular_vectors(a1), right_singular_vectors(a2), i, j)


def similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> list[list[float]]:
    """``grid[i - 1][j - 1] = phi(A1, A2, i, j)`` for every i, j up to the two ranks."""
    return _phi_grid(right_singular_vectors(a1), right_singular_vectors(a2))


def _checked_ij(a1: torch.Tensor, a2: torch.Tensor, i: int | None, j: int | None) -> tuple[int, int]:
    """``i`` and ``j`` (default: the ranks), after checking that they and the A matrices fit."""
    if a1.shape[1] != a2.shape[1]:
        raise ConfigError(f"the A matrices act on different input sizes ({a1.shape[1]} and {a2.shape[1]})")
    i = a1.shape[0] if i is None else i
    j = a2.shape[0] if j is None else j
    if not (1 <= i <= a1.shape[0] and 1 <= j <= a2.shape[0]):
        raise ConfigError(f"i and j must be in 1..{a1.shape[0]} and 1..{a2.shape[0]}, got {i}, {j}")
    return i, j


def _phi(u: torch.Tensor, v: torch.Tensor, i: int, j: int) -> float:
    """phi at ``i``, ``j`` from the right singular vectors ``u`` (of A1) and ``v`` (of A2)."""
    return float((u[:, :i].T @ v[:, :j]).pow(2).sum() / min(i, j))


def _phi_grid(u: torch.Tensor, v: torch.Tensor) -> list[list[float]]:
    """phi at every i, j from the right singular vectors ``u`` (of A1) and ``v`` (of A2)."""
    overlap = (u.T @ v).pow(2)                      # r1 x r2
    cumulative = overlap.cumsum(0).cumsum(1)       # [i-1, j-1] = ||U_i^T V_j||_F^2
    return [[float(cumulative[i, j] / min(i + 1, j + 1)) for j in range(v.shape[1])] for i in range(u.shape[1])]


def random_orthonormal(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """``r`` random orthonormal columns in R^n (QR of a Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return q


def amplification(w: torch.Tensor, dw: torch.Tensor, r: int | None = None, seed: int = 0) -> dict[str, float]:
    """How ``dw`` relates to ``w`` (both out x in) along r directions.

    Returns ``delta_norm`` (||dW||_F), ``w_on_delta`` (||U^T W V||_F, U, V: dW's top-r singular
    vectors), ``w_on_random`` (the same for r random orthonormal directions), ``w_on_top``
    (W's top-r directions) and ``factor`` = delta_norm / w_on_delta.
    """
    w, dw = w.detach().double(), dw.detach().double()
    if w.shape != dw.shape:
        raise ConfigError(f"W {tuple(w.shape)} and dW {tuple(dw.shape)} differ in shape")
    if r is None:
        r = int(torch.linalg.matrix_rank(dw))
    r = max(1, min(r, min(w.shape)))
    u, _, vh = torch.linalg.svd(dw, full_matrices=False)
    on_delta = float(torch.linalg.matrix_norm(u[:, :r].T @ w @ vh[:r].T))
    gen = torch.Generator().manual_seed(seed)
    ru, rv = random_orthonormal(w.shape[0], r, gen), random_orthonormal(w.shape[1], r, gen)
    on_random = float(torch.linalg.matrix_norm(ru.T @ w @ rv))
    top = float(torch.linalg.svdvals(w)[:r].pow(2).sum().sqrt())
    norm = float(torch.linalg.matrix_norm(dw))
    return {"r": r, "delta_norm": norm, "w_on_delta": on_delta, "w_on_random": on_random, "w_on_top": top,
            "factor": norm / on_delta if on_delta > 0 else float("inf")}


# --- adapters on disk ------------------------------------------------------------------------

def read_lora_a(folder: str | Path) -> dict[str, torch.Tensor]:
    """``{module path: A}`` from a LoRA adapter folder (PEFT-format safetensors)."""
    folder = Path(folder)
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise AdapterFileError(f"{folder} is not an adapter folder (it needs adapter_config.json and "
                               f"adapter_model.safetensors)")
    kind = str(json.loads(config.read_text()).get("peft_type", "")).upper()
    if kind != "LORA":
        raise ConfigError(f"{folder} holds a {kind or 'non-LoRA'} adapter; subspace analysis needs LoRA's A matrices")
    out = {}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            for suffix in _A_SUFFIXES:
                if key.endswith(suffix):
                    name = key[: -len(suffix)].removeprefix(KEY_PREFIX)
                    out[name] = fh.get_tensor(key).float()
    if not out:
        raise AdapterFileError(f"{weights} holds no LoRA A matrices")
    return out


def layer_and_kind(module: str) -> tuple[int | None, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``(3, "query")``."""
    numbers = re.findall(r"\.(\d+)\.", f".{module}.")
    return (int(numbers[-1]) if numbers else None), module.rsplit(".", 1)[-1]


def compare_adapters(adapter_a: str | Path, adapter_b: str | Path, i: int | None = None, j: int | None = None,
                     out: Path | None = None) -> dict:
    """phi per module shared by two LoRA adapters (at ``i``, ``j``; default their ranks), the
    full phi grid of each, and with ``out`` heat maps: one per module and ``phi_by_layer.png``."""
    a, b = read_lora_a(adapter_a), read_lora_a(adapter_b)
    shared = [m for m in a if m in b]
    if not shared:
        raise ConfigError(f"the two adapters adapt no module in common ({', '.join(sorted(a)[:3])} ... vs "
                          f"{', '.join(sorted(b)[:3])} ...)")
    modules = []
    for name in shared:
        r_a, r_b = a[name].shape[0], b[name].shape[0]
        ii, jj = _checked_ij(a[name], b[name], min(i or r_a, r_a), min(j or r_b, r_b))
        u, v = right_singular_vectors(a[name]), right_singular_vectors(b[name])
        layer, kind = layer_and_kind(name)
        modules.append({"module": name, "layer": layer, "kind": kind, "r_a": r_a, "r_b": r_b, "i": ii, "j": jj,
                        "phi": _phi(u, v, ii, jj), "grid": _phi_grid(u, v)})
    result = {"adapter_a": str(adapter_a), "adapter_b": str(adapter_b), "modules": modules,
              "mean_phi": sum(m["phi"] for m in modules) / len(modules)}
    if out is not None:
        result["plots"] = _similarity_plots(modules, Path(out))
        (Path(out) / "subspace.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _similarity_plots(modules: list[dict], out: Path) -> list[str]:
    from deltatune.experiments.plots import heatmap

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for m in modules:
        path = out / f"phi_{re.sub(r'[^A-Za-z0-9.]+', '_', m['module'])}.png"
        written += [str(p) for p in heatmap(m["grid"], path, f"phi(A, B, i, j): {m['module']}", "j", "i",
                                            range(1, m["r_b"] + 1), range(1, m["r_a"] + 1)).values()]
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    kinds = sorted({m["kind"] for m in modules})
    if layers:
        matrix = [[float("nan")] * len(kinds) for _ in layers]
        for m in modules:
            if m["layer"] is not None:
                matrix[layers.index(m["layer"])][kinds.index(m["kind"])] = m["phi"]
        written += [str(p) for p in heatmap(matrix, out / "phi_by_layer.png", "phi at (i, j) per layer and module",
                                            "module", "layer", kinds, layers).values()]
    return written


def format_similarity(result: dict) -> str:
    """A Markdown table of phi per module."""
    lines = ["| module | r (A) | r (B) | i | j | phi |", "|---|---|---|---|---|---|"]
    for m in result["modules"]:
        lines.append(f"| {m['module']} | {m['r_a']} | {m['r_b']} | {m['i']} | {m['j']} | {m['phi']:.4f} |")
    lines.append(f"| mean | | | | | {result['mean_phi']:.4f} |")
    return "\n".join(lines) + "\n"


def adapter_amplification(adapter: str | Path, model: str | None = None, rank: int | None = None,
                          seed: int = 0) -> dict:
    """:func:`amplification` for every LoRA linear layer of an adapter, on its base model
    (``model``: alias or folder; default the one the adapter records)."""
    from deltatune.methods.lora.layer import LoraLinear
    from deltatune.train.adapter_info import load_adapted

    read_lora_a(adapter)  # a clear error for a folder that is not a LoRA adapter
    adapted, _, _ = load_adapted(adapter, model)
    modules = []
    with torch.no_grad():
        for path, layer in adapted.named_modules():
            if not isinstance(layer, LoraLinear):
                continue
            for name in layer.lora_A:
                dw = layer.delta_weight(name)
                w = layer.base_layer.weight
                r = rank or layer.lora_A[name].weight.shape[0]
                layer_id, kind = layer_and_kind(path)
                modules.append({"module": path.removeprefix("base_model.").removeprefix("model."), "layer": layer_id,
                                "kind": kind, **amplification(w, dw, r, seed)})
    if not modules:
        raise ConfigError(f"{adapter} has no LoRA linear layers to analyse")
    return {"adapter": str(adapter), "modules": modules}


def format_amplification(result: dict) -> str:
    """A Markdown table of the amplification numbers per module."""
    lines = ["| module | r | ‖ΔW‖_F | ‖UᵀWV‖_F (ΔW dirs) | random dirs | W's top dirs | factor ‖ΔW‖/‖UᵀWV‖ |",
             "|---|---|---|---|---|---|---|"]
    for m in result["modules"]:
        lines.append(f"| {m['module']} | {m['r']} | {m['delta_norm']:.4f} | {m['w_on_delta']:.4f} | "
                     f"{m['w_on_random']:.4f} | {m['w_on_top']:.4f} | {m['factor']:.2f} |")
    return "\n".join(lines) + "\n"
