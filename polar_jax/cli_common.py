"""What every `polar-jax` verb shares: the argument parser class, model and sparsity flags, model loading.

A mistake in the command line is a `CommandLineError` (one `error: ...` line, exit 2, printed by
polar_jax.cli.main); numeric flags are typed by polar_jax.validate, so the CLI and the API refuse the same
values. Help shows every default.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from polar_jax.checkpoint import DEFAULT_MODEL_DIR, is_polar_checkpoint, load, load_hf
from polar_jax.dtypes import DTYPE_NAMES
from polar_jax.errors import CheckpointError, InputError
from polar_jax.models import CausalLM
from polar_jax.policy import PARTS, choose_variant, device_kind
from polar_jax.routers.bundle import SparsityBundle, load_sparsity
from polar_jax.tokenizer import Tokenizer
from polar_jax.validate import arg_type

POLICIES = ("auto", *PARTS)


class CommandLineError(InputError):
    """A command line argparse refuses (unknown flag, missing argument, value out of range)."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says what the default is, or there is
    no default to show (None, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in the help and errors raised (not printed with the usage and exited), so
    `main` prints them as one line; sub-command parsers are made of the same class."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="converted checkpoint folder, Hugging Face folder, .gguf file, or 'default' (embedded model)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="compute dtype (default: the checkpoint's; float32 on a CPU-only host)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking a converted checkpoint's weights against its stored SHA-256 (trusted disks)")


def load_model(path: str, dtype: str | None = None, verify: bool = True,
               mesh: Any = None) -> tuple[CausalLM, Tokenizer | None]:
    """A converted checkpoint, "default", or an HF folder / GGUF file (converted on the fly); with a `mesh`,
    each tensor streamed onto its shards."""
    if path == "default" or is_polar_checkpoint(path):
        return load(path, dtype, mesh, verify=verify)
    if not Path(path).exists():
        raise InputError(f"model path {path} does not exist")
    return load_hf(path, dtype, mesh)


def model_input(path: str) -> Path:
    """The folder or file a --model value reads (for the rule that an output never replaces an input)."""
    return DEFAULT_MODEL_DIR if path == "default" else Path(path)


def load_from_args(args: argparse.Namespace, mesh: Any = None) -> tuple[CausalLM, Tokenizer | None]:
    return load_model(args.model, args.dtype, verify=not args.no_verify, mesh=mesh)


def require_tokenizer(tok: Tokenizer | None, model: str) -> Tokenizer:
    if tok is None:
        raise CheckpointError(f"{model} has no tokenizer files: this command needs text")
    return tok


def check_prompt(text: str, i: int) -> str:
    """A prompt from the command line: the shell may hand over bytes that are not UTF-8 (kept by Python as
    surrogates); refuse them here rather than fail inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"prompt {i} is not valid UTF-8 text") from None
    return text


# ---- sparse decoding flags ----------------------------------------------------------------------------
def add_sparsity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", default=None,
                   help="sparsity bundle folder or 'default' (the bundle of the embedded model); without it, dense")
    p.add_argument("--attn-density", type=arg_type("attn_density"), default=None,
                   help="fraction of heads / KV groups each sequence keeps (needs --sparsity; default: the bundle's)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="what to sparsify (needs --sparsity): auto = what the device's measured cost table says "
                        "is faster than dense (default auto)")
    p.add_argument("--adaptive", action="store_true",
                   help="input-adaptive head budgets (needs --sparsity): each sequence keeps the heads / KV groups "
                        "whose router logit passes the layer's calibrated threshold, between k/2 and 2k (k from "
                        "--attn-density), k on average over the calibration text")


@dataclasses.dataclass(frozen=True)
class SparseDecoding:
    """What a generate run decodes with: the bundle (None: dense) and the variant the policy chose."""

    bundle: SparsityBundle | None
    source: str | None
    attn_density: float | None
    policy: str | None
    variant: str  # dense | heads | mlp | both
    adaptive: bool = False  # input-adaptive head budgets

    @property
    def sparse(self) -> bool:
        return self.variant != "dense"

    def generate_kwargs(self) -> dict[str, Any]:
        if self.bundle is None:
            return {}
        return {"sparsity": self.bundle, "attn_density": self.attn_density, "policy": self.policy,
                "adaptive": self.adaptive}

    def describe(self) -> str:
        if self.bundle is None:
            return "dense (no --sparsity)"
        if not self.sparse:
            return (f"dense: policy {self.policy} chose dense here (routers from {self.source}; no measured "
                    f"speedup for this batch and context on {device_kind()}; --policy heads|mlp|both forces one)")
        density = "" if self.attn_density is None else f", attention density {self.attn_density}"
        adaptive = ", input-adaptive head budgets" if self.adaptive and PARTS[self.variant][0] else ""
        return f"sparse ({self.variant}, policy {self.policy}) with routers from {self.source}{density}{adaptive}"

    def to_dict(self) -> dict[str, Any]:
        return {"decode": "sparse" if self.sparse else "dense", "variant": self.variant, "policy": self.policy,
                "sparsity": self.source, "attn_density": self.attn_density, "adaptive": self.adaptive}


def sparse_decoding(args: argparse.Namespace, model: CausalLM, batch: int, context: int) -> SparseDecoding:
    """The sparsity flags resolved for a run of `batch` rows reaching `context` tokens."""
    if args.sparsity in (None, "none"):
        for flag, value in (("--attn-density", args.attn_density), ("--policy", args.policy),
                            ("--adaptive", args.adaptive or None)):
            if value is not None:
                raise InputError(f"{flag} needs --sparsity (a bundle folder or 'default'); without it decoding is dense")
        return SparseDecoding(None, None, None, None, "dense")
    bundle = load_sparsity(args.sparsity, model)
    policy = args.policy or "auto"
    variant = choose_variant(model.config, batch, context, bundle.config.mlp_router) if policy == "auto" else policy
    attn, mlp = PARTS[variant]
    if mlp and not bundle.config.mlp_router and policy != "mlp":
        mlp = False  # as sparse_selector does: a bundle without MLP routers sparsifies heads only
    variant = next(name for name, parts in PARTS.items() if parts == (attn, mlp))
    if args.adaptive and attn:
        bundle.config.adaptive_budgets(args.attn_density)  # a clear error now for a bundle without thresholds
    return SparseDecoding(bundle, args.sparsity, args.attn_density, policy, variant, bool(args.adaptive))
