"""lm-evaluation-harness adapter and runner.

The harness finds models only in its own registry (no plugin discovery), so
:func:`run_harness` registers :class:`ConceptLM` under ``"conceptvlm"`` and then calls
the harness's own ``lm_eval.simple_evaluate``. Scoring is the text suite's
(``eval/text.py``), so harness numbers and ``conceptvlm eval text`` numbers agree.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .generate import GenerateFn, batches, greedy_generate
from .text import loglikelihood, rolling_loglikelihood

if TYPE_CHECKING:
    from conceptvlm.errors import UserError

log = logging.getLogger(__name__)
MODEL_NAME = "conceptvlm"


class ConceptLM(LM):
    """``lm_eval.api.model.LM`` over an in-memory model + tokenizer (text only).

    ``max_length`` bounds every forward; ``stride`` is the rolling-window stride of
    ``loglikelihood_rolling`` (default ``max_length``, the harness HF model's windows, and
    ``text.perplexity``'s default, so both give the same numbers); ``max_gen_toks`` is the
    default generation length.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: Union[int, str] = 8,
                 max_length: int = 2048, stride: Optional[int] = None, max_gen_toks: int = 256,
                 generate_fn: GenerateFn = greedy_generate, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.info("ConceptLM ignores harness arguments %s", sorted(unused))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = max_length
        self.stride = stride
        self.max_gen_toks = max_gen_toks
        self.generate_fn = generate_fn

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``Instance.args = (ctx, cont)``."""
        pairs = [tuple(r.args) for r in requests]
        out = loglikelihood(self.model, self.tokenizer, pairs, max_length=self.max_length,
                            batch_size=self.batch_size)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        """Whole-document log-likelihood (conditioned on bos) in strided windows."""
        texts = [r.args[0] for r in requests]
        out = [lp for lp, _ in rolling_loglikelihood(
            self.model, self.tokenizer, texts, max_length=self.max_length, stride=self.stride,
            batch_size=self.batch_size)]
        for text, lp in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list) -> list[str]:
        """Greedy continuation of each context until any ``until`` string, eos or
        ``max_gen_toks``; the text is cut before the first stop string."""
        ctxs, untils, limits = [], [], []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample"):
                log.warning("ConceptLM decodes greedily; ignoring do_sample=True")
            until = kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            limits.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
            ctxs.append(ids[-max(1, self.max_length - limits[-1]):])
        outputs: list[str] = [""] * len(requests)
        for rows in batches(range(len(requests)), self.batch_size):
            def stop(r: int, ids: list[int], rows: list[int] = rows) -> bool:
                text = self.tokenizer.decode(ids)
                return any(u in text for u in untils[rows[r]])
            gen = self.generate_fn(self.model, [ctxs[i] for i in rows],
                                   max_new_tokens=[limits[i] for i in rows],
                                   eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                   stop=stop)
            for i, ids in zip(rows, gen):
                text = self.tokenizer.decode(ids)
                for u in untils[i]:
                    if u:
                        text = text.split(u)[0]
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def register() -> None:
    """Register :class:`ConceptLM` as the harness model ``"conceptvlm"`` (idempotent)."""
    from lm_eval.api.registry import model_registry
    try:
        if model_registry.get(MODEL_NAME) is ConceptLM:
            return
    except Exception:  # not registered yet
        pass
    register_model(MODEL_NAME)(ConceptLM)


def run_harness(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str],
                include_path: Optional[Union[str, Path, Sequence[Union[str, Path]]]] = None,
                limit: Optional[Union[int, float]] = None, *, num_fewshot: Optional[int] = None,
                batch_size: int = 8, max_length: int = 2048, stride: Optional[int] = None,
                max_gen_toks: int = 256, log_samples: bool = False,
                bootstrap_iters: int = 0, out_path: Optional[Union[str, Path]] = None) -> dict:
    """Run harness ``tasks`` (names, found in the harness and in ``include_path``).

    Registers the adapter, builds a ``TaskManager`` with ``include_path`` and calls
    ``lm_eval.simple_evaluate``. Returns the harness's results dict (``results``,
    ``configs``, ...; ``samples`` when ``log_samples``), JSON-safe, and writes it to
    ``out_path`` if given.
    """
    import lm_eval
    import lm_eval.tasks._factory
    from lm_eval.tasks import TaskManager

    from .io import write_json
    from .task_paths import relative_to_yaml

    register()
    if include_path is not None and not isinstance(include_path, (str, Path)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    task_manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:
        raise unknown_tasks_error(missing, "lm-eval", include_path)
    model_args = {"model": model, "tokenizer": tokenizer, "max_length": max_length,
                  "stride": stride, "max_gen_toks": max_gen_toks}
    with relative_to_yaml(lm_eval.tasks._factory, "load_yaml"):
        results = lm_eval.simple_evaluate(
            model=MODEL_NAME, model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot,
            batch_size=batch_size, limit=limit, task_manager=task_manager,
            log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    if results is None:  # not rank 0
        return {}
    config = results.get("config", {})
    config["model_args"] = {k: v for k, v in model_args.items() if k not in ("model", "tokenizer")}
    config["model"] = MODEL_NAME
    if out_path is not None:
        write_json(results, out_path)
    return results


def unknown_tasks_error(missing: Sequence[str], harness: str, include_path: Any) -> "UserError":
    """The one-line error for task names a harness does not know."""
    from conceptvlm.errors import UserError

    where = (f"check the names and the task YAMLs in {include_path}" if include_path
             else "check the names; a local task needs --include-path FOLDER (its YAML's folder)")
    return UserError(f"unknown {harness} task(s): {', '.join(missing)}", where)


def results_table(results: dict, make_table: Any = None) -> str:
    """The harness's own results table (and the groups table when there are groups);
    ``make_table``: the harness's function (default lm-eval's)."""
    if make_table is None:
        from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
