"""lmms-eval adapter and runner: the harness most VLM users evaluate with.

lmms-eval finds models in its registry (built-ins, plus the ``lmms_eval.models``
entry-point group, where this package's ``setup.cfg`` lists :func:`manifest`, so
``lmms-eval --model conceptvlm --model_args checkpoint=DIR`` works too).
:func:`run_lmms` registers :class:`ConceptVLMLmms` under ``"conceptvlm"``, builds it around
an in-memory model and calls the harness's own ``simple_evaluate``. Generation goes through
:func:`conceptvlm.ask.generate_texts`, the loop of ``conceptvlm generate``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_NAME = "conceptvlm"
CLASS_PATH = "conceptvlm.eval.lmms.ConceptVLMLmms"


def manifest():
    """The ``lmms_eval.models`` entry point: how lmms-eval finds this adapter by name."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


class ConceptVLMLmms(lmms):
    """``lmms_eval.api.model.lmms`` over a ConceptVLM: image + text in, text out.

    Give ``checkpoint`` (an exported model directory, either layout) or an in-memory
    ``model`` + ``tokenizer``. Images come from each task's ``doc_to_visual``; a context
    with ``<image>`` placeholders places them there, otherwise they go first (as in
    training's VQA samples).
    """

    is_simple = True

    def __init__(self, checkpoint: Optional[str] = None, model: Optional[torch.nn.Module] = None,
                 tokenizer: Any = None, batch_size: Union[int, str] = 8, max_new_tokens: int = 32,
                 **unused: Any) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("ConceptVLMLmms needs checkpoint=DIR (or model= and tokenizer=)")
            from conceptvlm.export import load_exported

            model, tokenizer = load_exported(checkpoint)
        if tokenizer is None:
            from conceptvlm.data import load_tokenizer

            tokenizer = load_tokenizer(None)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_new_tokens = int(max_new_tokens)

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        vis = doc_to_visual(self._doc(task, split, doc_id))
        return [v for v in (vis if isinstance(vis, (list, tuple)) else [vis]) if v is not None]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | images, context), is_greedy)`` per request."""
        from conceptvlm.ask import load_images, prompt_ids
        from conceptvlm.eval.generate import model_device

        out = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            pixels = load_images(self.model, self._visuals(doc_to_visual, task, split, doc_id))
            ctx = prompt_ids(self.model, self.tokenizer, context, 0 if pixels is None else pixels.shape[0])
            cont_ids = self.tokenizer.encode(cont)
            ids = torch.tensor([ctx + cont_ids], device=model_device(self.model))
            logits = self.model(ids, images=pixels).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
            target_ids = ids[0, len(ctx):]
            lp = float(logits.gather(-1, target_ids[:, None]).sum())
            greedy = bool((logits.argmax(-1) == target_ids).all())
            out.append((lp, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, cont), (lp, greedy))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in batches of requests that share generation settings (``until``,
        ``max_new_tokens``, ``temperature``, ``top_p``)."""
        from conceptvlm.ask import GenerationOptions, generate_texts
        from conceptvlm.eval.generate import batches

        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1] or {}, sort_keys=True, default=str), []).append(i)
        answers = [""] * len(requests)
        for rows in groups.values():
            kw = dict(args[rows[0]][1] or {})
            until = kw.get("until") or []
            opts = GenerationOptions(
                max_new_tokens=int(kw.get("max_new_tokens", self.max_new_tokens)),
                temperature=float(kw.get("temperature") or 0.0) if kw.get("do_sample", True) else 0.0,
                top_p=float(kw.get("top_p") or 1.0), stop=tuple([until] if isinstance(until, str) else until))
            for batch in batches(rows, self.batch_size):
                texts = [args[i][0] for i in batch]
                visuals = [self._visuals(args[i][2], args[i][4], args[i][5], args[i][3]) for i in batch]
                for i, text in zip(batch, generate_texts(self.model, self.tokenizer, texts, visuals, opts)):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("ConceptVLM answers single-round prompts; multi-round lmms-eval tasks are not supported")


def register() -> None:
    """Register :class:`ConceptVLMLmms` as the lmms-eval model ``"conceptvlm"`` (idempotent)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def run_lmms(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str],
             include_path: Optional[Union[str, Path, Sequence[Union[str, Path]]]] = None,
             limit: Optional[Union[int, float]] = None, *, batch_size: int = 8, max_new_tokens: int = 32,
             log_samples: bool = False, out_path: Optional[Union[str, Path]] = None) -> dict:
    """Run lmms-eval ``tasks`` (found in the harness and in ``include_path``; data paths in
    those YAMLs resolve against each YAML's folder). Returns the harness's results dict,
    JSON-safe, and writes it to ``out_path`` if given."""
    import lmms_eval.utils
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .harness import unknown_tasks_error
    from .io import write_json
    from .task_paths import relative_to_yaml

    register()
    paths = None if include_path is None else (
        [str(include_path)] if isinstance(include_path, (str, Path)) else [str(p) for p in include_path])
    with relative_to_yaml(lmms_eval.utils, "load_yaml_config"):
        # The harness's ~300 built-in task folders take long to index; a run of local tasks skips them.
        manager = TaskManager("WARNING", include_path=paths, include_defaults=paths is None, model_name=MODEL_NAME)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing and paths is not None:
            manager = TaskManager("WARNING", include_path=paths, include_defaults=True, model_name=MODEL_NAME)
            missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise unknown_tasks_error(missing, "lmms-eval", include_path)
        lm = ConceptVLMLmms(model=model, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                  batch_size=batch_size, log_samples=log_samples, bootstrap_iters=0,
                                  verbosity="WARNING")
    if results is None:  # not rank 0
        return {}
    results.setdefault("config", {})["model"] = MODEL_NAME
    results["config"]["model_args"] = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    if out_path is not None:
        write_json(results, out_path)
    return results

