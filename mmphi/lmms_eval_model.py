"""MM-Phi as an lmms-eval model: `lmms-eval --model mmphi --model_args pretrained=<folder or hub id>[,adapter=...]
--tasks <task>` runs any of lmms-eval's image tasks (generate_until and loglikelihood).

Registered the way lmms-eval documents for external models: the `lmms_eval.models` entry point in setup.cfg
(`mmphi = mmphi.lmms_eval_model:manifest`), so installing this repo is enough. lmms-eval is optional here
(`pip install lmms-eval`); this module imports it only when lmms-eval loads it.

Prompts go through MM-Phi's own chat template (the task's text as the user turn, its image first), exactly as in
training; answers are greedy unless the task asks to sample, cut at the task's `until` strings.

Known upstream limit (lmms-eval 0.7.3): its evaluator passes every response through `unwrap_generation_output`,
which turns a loglikelihood result `(float, bool)` into a string, so `multiple_choice` / `loglikelihood` tasks fail
in its scoring for every model. `MMPhi.loglikelihood` returns what the `lmms` API specifies (tested directly).
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from mmphi.inference import Chat, ChatTurn, GenerationOptions, generate_answers, prepare_inputs
from mmphi.loading import load_mmphi
from processing_mmphi import IMAGE_TOKEN


def manifest():
    """The entry point lmms-eval loads (group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmphi", simple_class_path="mmphi.lmms_eval_model.MMPhi")


class MMPhi(lmms):
    is_simple = True

    def __init__(self, pretrained: str, adapter: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 8, max_new_tokens: int = 128, allow_other_base: bool | str = False,
                 trust_remote_code: bool | str = False, **unused):
        super().__init__()
        self.model, self.processor = load_mmphi(pretrained, adapter=adapter, device=device, dtype=dtype,
                                                allow_other_base=str(allow_other_base).lower() in ("true", "1"),
                                                trust_remote_code=str(trust_remote_code).lower() in ("true", "1"))
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)

    # --- what lmms-eval asks of a model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.model.device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of requests with the same generation settings, longest prompts first; answers in request order."""
        answers: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        batches = [order[start: start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="mmphi generate_until", unit="batch"):
            by_settings: dict[str, list[int]] = {}
            for index in batch:
                by_settings.setdefault(repr(sorted(requests[index].args[1].items())), []).append(index)
            for indices in by_settings.values():
                gen_kwargs = dict(requests[indices[0]].args[1])
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                turns = [self._request_turn(requests[i]) for i in indices]
                inputs, _ = prepare_inputs(self.processor, [Chat() for _ in turns], turns)
                texts = generate_answers(self.model, self.processor, inputs, self._options(gen_kwargs))
                for index, text in zip(indices, texts, strict=True):
                    answers[index] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | prompt) summed over the continuation's tokens, and whether greedy decoding would
        produce exactly them; the prompt is the chat template's user turn up to "Assistant:"."""
        results = []
        for request in tqdm(requests, desc="mmphi loglikelihood", unit="request"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            turn = self._turn(context, doc_to_visual(doc))
            prompt_text = self.processor.apply_chat_template(Chat().prompt_messages(turn), add_generation_prompt=True)
            images = turn.images
            prompt = self.processor(text=[prompt_text], images=images or None)
            full = self.processor(text=[prompt_text + continuation], images=images or None)
            n_prompt, ids = prompt["input_ids"].shape[1], full["input_ids"]
            if ids.shape[1] <= n_prompt or not torch.equal(ids[0, :n_prompt], prompt["input_ids"][0]):
                raise ValueError(f"{task} doc {doc_id}: the continuation {continuation!r} does not tokenise after "
                                 "the prompt")
            with torch.inference_mode():
                logits = self.model(**full.to(self.model.device)).logits[0, n_prompt - 1: -1].float()
            targets = ids[0, n_prompt:].to(logits.device)
            log_probs = torch.log_softmax(logits, dim=-1)
            total = log_probs.gather(1, targets[:, None]).sum().item()
            greedy = bool((logits.argmax(dim=-1) == targets).all())
            results.append((total, greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, (total, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("MM-Phi's lmms-eval adapter answers single-round tasks (generate_until, "
                                  "loglikelihood)")

    # --- prompts: the chat module's turns, as in `chat.py` (one `<image>` per image, in order)

    def _request_turn(self, request: Instance) -> ChatTurn:
        context, _, doc_to_visual, doc_id, task, split = request.args
        return self._turn(context, doc_to_visual(self.task_dict[task][split][doc_id]))

    @staticmethod
    def _turn(context: str, visuals) -> ChatTurn:
        images = [v for v in (visuals or []) if v is not None]
        if not all(hasattr(image, "convert") for image in images):
            kinds = sorted({type(image).__name__ for image in images})
            raise ValueError(f"MM-Phi's lmms-eval adapter answers image tasks; got {', '.join(kinds)}")
        return ChatTurn(context.replace(IMAGE_TOKEN, "").strip(), image=[image.convert("RGB") for image in images])

    def _options(self, gen_kwargs: dict) -> GenerationOptions:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        return GenerationOptions(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
                                 do_sample=do_sample, temperature=temperature or 1.0,
                                 top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0))


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text.strip()

