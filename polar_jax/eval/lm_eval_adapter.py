"""polar-jax models in EleutherAI's lm-evaluation-harness (extra `eval`: `pip install "polar-jax[eval]"`).

    from lm_eval import simple_evaluate
    from polar_jax.eval.lm_eval_adapter import PolarLM
    from polar_jax.eval.lm_eval_tasks import TASKS_DIR
    from lm_eval.tasks import TaskManager
    lm = PolarLM(model="default", sparsity="default", attn_density=0.5)
    simple_evaluate(model=lm, tasks=["polar_next_sentence"], task_manager=TaskManager(include_path=str(TASKS_DIR)))

or from the shell: `polar-jax eval lm-eval --model_args model=PATH,sparsity=PATH,attn_density=0.5 --tasks ...`
(polar_jax/eval/lm_eval_cli.py). Importing this module registers the class as lm-eval model "polar-jax".

Dense by default; `sparsity` (a bundle folder or "default") makes it sparse with the trained routers.
Sparse scoring: the context is prefilled densely and each continuation token gets decode semantics, each
request being its own decode stream (MLP neurons from that sequence, MLP k for batch size 1), so scores do
not depend on `batch_size` (see polar_jax/eval/lm_eval_scoring.py). Sparse generation follows the same rule:
with MLP sparsity each request is generated on its own; attention-only sparsity (per sequence anyway) and
dense generation run in batches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

import polar_jax
from polar_jax.cli_common import load_model
from polar_jax.errors import InputError
from polar_jax.eval.lm_eval_scoring import continuation_scores
from polar_jax.eval.sparse_ppl import build_sparsifier
from polar_jax.models import CausalLM
from polar_jax.routers.bundle import SparsityBundle
from polar_jax.routers.sparsify import router_selector

DEFAULT_MAX_LENGTH = 2048  # cap for models with very long position ranges (logits memory grows with it)

log = logging.getLogger(__name__)


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InputError(f"{name} must be true or false, got {value!r}")


def _as_int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum or out != float(value):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _optional_float(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None


@register_model("polar-jax")
class PolarLM(TemplateLM):
    """lm-eval `LM` over a polar-jax model.

    model: checkpoint folder, HF folder, "default", or a loaded `CausalLM` (then pass `tokenizer`).
    sparsity: bundle folder, "default", a loaded `SparsityBundle`, or None/"none" for dense.
    attn_density, mlp_recall, per_layer, attn, mlp, adaptive: as `polar-jax eval ppl` (attn/mlp false keep that part
    dense; adaptive: input-adaptive head budgets).
    batch_size: requests per forward pass. max_length: positions the model sees (default: the model's, at most
    2048). max_gen_toks: default generation length. prefix_token_id: token that stands for an empty context
    (default BOS, else EOS). add_bos_token: prepend BOS to every encoded context (LLaMA-style checkpoints).
    verify: check a converted checkpoint's weights against its weights_sha256 (false: `--no-verify`).
    """

    def __init__(
        self,
        model: str | CausalLM = "default",
        sparsity: str | SparsityBundle | None = None,
        attn_density: float | None = None,
        mlp_recall: float | None = 0.99,
        per_layer: bool = False,
        attn: bool = True,
        mlp: bool = True,
        adaptive: bool | str = False,
        tokenizer: Any = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        add_bos_token: bool = False,
        seed: int = 0,
        verify: bool | str = True,
        device: Any = None,  # lm-eval passes these; JAX places arrays on its default backend
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(model, CausalLM):
            if tokenizer is None:
                raise InputError("a loaded model needs its tokenizer: PolarLM(model=model, tokenizer=tok)")
            self.model, self.tokenizer, self.model_name = model, tokenizer, model.config.model_type
        else:
            if model != "default" and not Path(str(model)).exists():
                raise InputError(f"model path {model} does not exist")
            self.model, tok = load_model(str(model), dtype, verify=_as_bool(verify, "verify"))
            if tok is None:
                raise InputError(f"{model} has no tokenizer files; lm-eval works on text")
            self.tokenizer, self.model_name = tokenizer or tok, str(model)
        cfg = self.model.config
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise InputError(f"batch_size must be a number (no 'auto'), got {batch_size!r}")
        self.batch_size = _as_int(batch_size, "batch_size")
        self.max_length = (min(cfg.max_position_embeddings, DEFAULT_MAX_LENGTH) if max_length is None
                           else _as_int(max_length, "max_length", 2))
        if self.max_length > cfg.max_position_embeddings and cfg.family == "opt":
            raise InputError(f"max_length {self.max_length} exceeds the model's {cfg.max_position_embeddings} positions")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.seed = _as_int(seed, "seed", 0)
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else self.tokenizer.eos_token_id
        if eos is None:
            raise InputError("the model defines no EOS token; lm-eval needs one as end-of-text")
        self._eot = int(eos)
        if prefix_token_id is not None:
            self._prefix = _as_int(prefix_token_id, "prefix_token_id", 0)
        else:
            self._prefix = int(cfg.bos_token_id) if cfg.bos_token_id is not None else self._eot
        if self.add_bos_token and cfg.bos_token_id is None:
            raise InputError("add_bos_token=true but the model defines no BOS token")

        self.bundle = self._bundle(sparsity)
        attn, mlp = _as_bool(attn, "attn"), _as_bool(mlp, "mlp")
        self.sparse_options = dict(
            attn_density=_optional_float(attn_density, "attn_density"),
            mlp_recall=_optional_float(mlp_recall, "mlp_recall"),
            per_layer=_as_bool(per_layer, "per_layer"), attn=attn, mlp=mlp, adaptive=_as_bool(adaptive, "adaptive"),
        )
        if self.bundle is None:
            if self.sparse_options["adaptive"]:
                raise InputError("adaptive=true sets the routers' head budgets: it needs sparsity= (a bundle)")
            self.sparsifier = self.selector = None
        else:
            o = self.sparse_options
            self.sparsifier = build_sparsifier(self.model, self.bundle, "router", o["attn_density"], o["mlp_recall"],
                                               o["per_layer"], attn, mlp, o["adaptive"])
            self.selector = router_selector(self.bundle, o["attn_density"], o["mlp_recall"], o["per_layer"], attn, mlp,
                                            adaptive=o["adaptive"])

    def _bundle(self, sparsity: Any) -> SparsityBundle | None:
        if sparsity is None or (isinstance(sparsity, str) and sparsity.lower() == "none"):
            return None
        if isinstance(sparsity, SparsityBundle):
            sparsity.check_model(self.model)
            return sparsity
        if sparsity != "default" and not Path(str(sparsity)).exists():
            raise InputError(f"sparsity bundle {sparsity} does not exist")
        return polar_jax.load_sparsity(str(sparsity), self.model)

    # ---- tokens -----------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return self.model_name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer.encode(string)
        if self.add_bos_token and add_special_tokens is not False:
            ids = [int(self.model.config.bos_token_id)] + ids
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- log-likelihoods --------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        seqs = [(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests]
        scored = continuation_scores(self.model, seqs, self.sparsifier, self.batch_size, self.max_length,
                                     progress=not disable_tqdm, desc="polar-jax loglikelihood")
        out = []
        for (key, _, _), s in zip(requests, scored):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: disjoint windows of `max_length` predictions, each window conditioned on
        the tokens before it (lm-eval's rolling protocol); the first token is predicted from the prefix token."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = np.zeros(len(requests), np.float64)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # ---- generation -------------------------------------------------------------------------------------
    def _mlp_sparse(self) -> bool:
        sel = self.selector
        return sel is not None and sel.use_mlp and sel.plan is not None and any(a is not None for a in sel.mlp_a)

    def _generate_batch(self, contexts: list[list[int]], max_gen: int, temperature: float, top_p: float) -> np.ndarray:
        """Rows padded to the batch size with copies of the first (one compiled program per length bucket)."""
        padded = contexts + [contexts[0]] * (self.batch_size - len(contexts))
        out = polar_jax.generate(self.model, padded, max_gen, temperature=temperature, top_p=top_p, seed=self.seed,
                                 selector=self.selector)
        return out[: len(contexts)]

    def _cut(self, row: np.ndarray, until: list[str]) -> str:
        eos = set(self.model.config.eos_token_ids) | {self._eot}
        tokens = []
        for t in row:
            if int(t) in eos:
                break
            tokens.append(int(t))
        text = self.tok_decode(tokens)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate until a stop string (or EOS, or `max_gen_toks`); greedy unless `do_sample`. Contexts are cut
        from the left to leave room for `max_gen_toks` within `max_length`."""
        groups: dict[str, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=None)
            max_gen = _as_int(kw.pop("max_gen_toks"), "max_gen_toks")
            if max_gen >= self.max_length:
                raise InputError(f"max_gen_toks {max_gen} leaves no room for a context within max_length {self.max_length}")
            temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample") else 0.0
            top_p = float(kw.get("top_p", 1.0) or 1.0)
            ctx = self.tok_encode(context)[-(self.max_length - max_gen):] if context else []
            parsed.append((ctx or [self.prefix_token_id], until, max_gen, temperature, top_p))
            groups.setdefault(json.dumps([max_gen, temperature, top_p]), []).append(i)
        per_request = self._mlp_sparse()  # the MLP union would otherwise mix requests
        step = 1 if per_request else self.batch_size
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="polar-jax generate_until", unit="req", disable=disable_tqdm) as bar:
            for members in groups.values():
                members = sorted(members, key=lambda i: -len(parsed[i][0]))
                for lo in range(0, len(members), step):
                    idx = members[lo : lo + step]
                    _, _, max_gen, temperature, top_p = parsed[idx[0]]
                    if per_request:
                        out = polar_jax.generate(self.model, [parsed[idx[0]][0]], max_gen, temperature=temperature,
                                                 top_p=top_p, seed=self.seed, selector=self.selector)
                    else:
                        out = self._generate_batch([parsed[i][0] for i in idx], max_gen, temperature, top_p)
                    for row, i in enumerate(idx):
                        results[i] = self._cut(out[row], parsed[i][1])
                        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                    bar.update(len(idx))
        return results  # type: ignore[return-value]
