"""peft LoHa and LoKr adapters (``peft_type`` ``LOHA`` / ``LOKR``): their weight update, read for geometry.

peft (``peft/tuners/loha``, ``peft/tuners/lokr``) saves, per adapted ``nn.Linear``:

* LoHa: ``<module>.hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in)``, ``hada_w2_a`` ``(out, r)``,
  ``hada_w2_b`` ``(r, in)``; update ``((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r`` (a Hadamard product:
  its rank can reach ``r**2``).
* LoKr: ``<module>.lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, and ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b``;
  update ``kron(w1, w2) * alpha / r``.

``r`` and ``alpha`` (the config's ``alpha`` field, not ``lora_alpha``) follow ``rank_pattern`` /
``alpha_pattern`` as for LoRA. The update of each module is formed densely (these modules are small:
one ``out x in`` matrix at a time) and stored as its **exact thin SVD factors** at its numerical rank,
``B = U_k S_k`` ``(out, k)``, ``A = V_k^T`` ``(k, in)``, scale 1 (``r = alpha = k``): every factored analysis
and merge then works unchanged, and ``B @ A`` equals peft's ``get_delta_weight`` to float32 rounding.
The factors are SVD-derived: they are not the stored LoHa / LoKr factors, and an export writes a LoRA.

Refused with one line: the CP / Tucker forms of convolutions (``hada_t1`` / ``hada_t2`` / ``lokr_t2``)
and any factor that is not 2-D (conv LoHa / LoKr).
"""

from __future__ import annotations

import re

import torch

from geometry.errors import AdapterLoadError
from geometry.io.config import PEFT_PREFIX, rank_and_alpha
from geometry.io.naming import has_two_stacks, module_key
from geometry.types import Adapter, LoraModule, ModuleKey

#: peft types read by this module.
LYCORIS_TYPES = ("LOHA", "LOKR")
KEY_RE = re.compile(
    r"^(?P<mod>.+)\.(?P<slot>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)(?:\.(?P<ad>[^.]+))?(?:\.weight)?$")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def lycoris_delta(label: str, mod: str, slot: dict[str, tuple[str, torch.Tensor]], peft_type: str) -> torch.Tensor:
    """The unscaled update ``(out, in)`` of one LoHa / LoKr module in float64 (peft's formula)."""
    for key, t in slot.values():
        if t.dtype not in _DTYPES:
            raise AdapterLoadError(f"{label}: tensor {key} has dtype {t.dtype}, expected a floating-point factor")
        if t.numel() == 0:
            raise AdapterLoadError(f"{label}: tensor {key} has shape {tuple(t.shape)}, an empty factor")
    cp = [slot[s][0] for s in ("hada_t1", "hada_t2", "lokr_t2") if s in slot]
    if cp:
        raise AdapterLoadError(
            f"{label}: tensor {cp[0]} is a CP-decomposed convolution factor (use_effective_conv2d), which Adapter "
            "Atlas does not read (supported: LoHa / LoKr of linear layers)")
    for key, t in slot.values():
        if t.dim() != 2:
            raise AdapterLoadError(
                f"{label}: tensor {key} has shape {tuple(t.shape)}, expected a 2-D factor (LoHa / LoKr of linear "
                "layers only; convolution modules are not read)")

    def get(name: str) -> torch.Tensor:
        if name not in slot:
            have = ", ".join(sorted(slot))
            raise AdapterLoadError(f"{label}: {peft_type} module {mod} has {have} but no {name} tensor")
        return slot[name][1].double()

    def product(a: str, b: str) -> torch.Tensor:
        x, y = get(a), get(b)
        if x.shape[1] != y.shape[0]:
            raise AdapterLoadError(
                f"{label}: module {mod}: {slot[a][0]} {tuple(x.shape)} and {slot[b][0]} {tuple(y.shape)} do not "
                "chain (expected (p, r) and (r, q))")
        return x @ y

    if peft_type == "LOHA":
        w1, w2 = product("hada_w1_a", "hada_w1_b"), product("hada_w2_a", "hada_w2_b")
        if w1.shape != w2.shape:
            raise AdapterLoadError(
                f"{label}: LoHa module {mod}: w1_a @ w1_b is {tuple(w1.shape)} but w2_a @ w2_b is {tuple(w2.shape)}; "
                "expected both (out, in)")
        return w1 * w2
    w1 = get("lokr_w1") if "lokr_w1" in slot else product("lokr_w1_a", "lokr_w1_b")
    w2 = get("lokr_w2") if "lokr_w2" in slot else product("lokr_w2_a", "lokr_w2_b")
    return torch.kron(w1, w2)


def thin_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, A)`` with ``B @ A = delta`` at its numerical rank (``U S``, ``V^T``, float32), or None when zero."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return None
    tol = float(S[0]) * max(delta.shape) * torch.finfo(torch.float64).eps
    k = int((S > tol).sum())
    return (U[:, :k] * S[:k]).to(torch.float32).contiguous(), Vh[:k].to(torch.float32).contiguous()


def lycoris_entries(adapter: Adapter, state: dict[str, torch.Tensor], label: str,
                    cfg_label: str) -> list[tuple[str, ModuleKey, LoraModule]]:
    """A LoHa / LoKr state dict as ``(module, key, LoraModule)`` entries (SVD factors of each update; the
    caller places them); other tensors go to ``adapter.other_tensors``, notes to ``adapter.warnings``."""
    config = adapter.config
    kind = config.peft_type
    prefix = "hada_" if kind == "LOHA" else "lokr_"
    slots: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    names: set[str] = set()
    for key, t in state.items():
        if t.dtype in _DTYPES and not bool(torch.isfinite(t).all()):
            raise AdapterLoadError(f"{label}: tensor {key} contains NaN or Inf values")
        m = KEY_RE.match(key.removeprefix(PEFT_PREFIX))
        if m and m.group("slot").startswith(prefix):
            slot = slots.setdefault(m.group("mod"), {})
            if m.group("slot") in slot:
                raise AdapterLoadError(f"{label}: module {m.group('mod')} has two {m.group('slot')} tensors")
            slot[m.group("slot")] = (key, t)
            if m.group("ad"):
                names.add(m.group("ad"))
        else:
            adapter.other_tensors[key] = t
    if len(names) > 1:
        raise AdapterLoadError(f"{label}: tensors of several adapters ({', '.join(sorted(names))}); save one adapter per file")
    if not slots:
        raise AdapterLoadError(f"{label}: no {kind} tensors ({prefix}*) in the weights file (peft_type {kind!r})")
    two = has_two_stacks(list(slots), config.task_type)
    entries: list[tuple[str, ModuleKey, LoraModule]] = []
    zero: list[str] = []
    for mod in sorted(slots):
        delta = lycoris_delta(label, mod, slots[mod], kind)
        r, alpha = rank_and_alpha(config, mod, source=cfg_label)
        found = thin_factors(delta * (alpha / r))
        if found is None:
            zero.append(mod)
            continue
        B, A = found
        k = int(A.shape[0])
        for key, rows in module_key(mod, out_features=int(B.shape[0]), in_features=int(A.shape[1]), two_stacks=two,
                                    base_model=config.base_model_name_or_path):
            entries.append((mod, key, LoraModule(name=mod, key=key, A=A, B=B if rows is None else B[rows[0]:rows[1]],
                                                 r=k, alpha=float(k), scale=1.0, rows=rows)))
    word = "LoHa" if kind == "LOHA" else "LoKr"
    adapter.warnings.append(
        f"{word}: each module's update was formed densely and is analysed as its exact thin SVD factors "
        "(B = U S, A = V^T at its numerical rank, scale 1), not the stored factors")
    if zero:
        adapter.warnings.append(f"{len(zero)} {word} module(s) with a zero update left out: {', '.join(zero[:5])}")
    return entries
