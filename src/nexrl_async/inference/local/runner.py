"""The model runner: executes one scheduler step on the torch thread.

A step, in order: drop the rows the scheduler removed (aborted / retracted), decode one token
for every running row (one batched forward), prefill the admitted sequences (one batched
forward) and merge them into the batch, draw one token per row, detect finished rows and
remove them. Everything here is synchronous and runs only inside
``anyio.to_thread.run_sync(..., limiter=<one>)``, so the runner is never entered twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from nexrl_async.core.token_codec import TokenCodec
from nexrl_async.inference.local.batch import DecodeBatch
from nexrl_async.inference.local.detokenizer import (
    Ending,
    IncrementalText,
    final_text,
    final_texts,
    find_stop,
)
from nexrl_async.inference.local.lean_forward import forward_for
from nexrl_async.inference.local.sampling import RowSampler, draw
from nexrl_async.inference.local.step_plan import (
    Admission,
    FinishReason,
    InputLogprobs,
    LogprobEntry,
    RowOutput,
    StepPlan,
    StepResult,
    finish_length,
    finish_stop,
)
from nexrl_async.inference.local.weights import load_tensors, read_safetensors, swap_weights


@dataclass(kw_only=True, slots=True)
class _Row:
    admission: Admission
    sampler: RowSampler
    output_ids: list[int]
    text: IncrementalText | None
    """Tracked only where needed: streams (cumulative text) and stop strings."""


def _entries(values: torch.Tensor, ids: torch.Tensor) -> list[LogprobEntry]:
    return [(float(v), int(i)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]


class ModelRunner:
    """Owns the model, the running :class:`DecodeBatch` and the per-row sampling state."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Tokenizer, *, eos_ids: frozenset[int], version: str
    ) -> None:
        self.model = model
        self._live: dict[str, torch.Tensor] | None = None
        self.tokenizer = tokenizer
        self.codec = TokenCodec(tokenizer)
        self.eos_ids = eos_ids
        self.weight_version = version
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.forward = forward_for(model)
        self._batch = DecodeBatch.empty()
        self._rows: list[_Row] = []

    @property
    def active(self) -> int:
        return len(self._rows)

    def step(self, plan: StepPlan) -> StepResult:
        with torch.inference_mode():
            dropped = self._drop(set(plan.drop))
            outputs: list[RowOutput] = []
            stepping = 0
            if plan.decode:
                logits = [self._batch.decode(self.forward)] if self._rows else []
                new_rows, new_logits, inputs = self._prefill(plan.admit)
                if new_logits is not None:
                    logits.append(new_logits)
                rows = self._rows + new_rows
                stepping = len(rows)
                if rows:
                    outputs = self._advance(rows, torch.cat(logits), inputs)
            return StepResult(
                outputs=outputs,
                dropped_text=dropped,
                weight_version=self.weight_version,
                batch_size=stepping,
            )

    def load_weights(self, model_dir: str | Path, version: str | None) -> int:
        """Swap in the weights of ``model_dir`` between steps; returns tensors loaded."""
        count = swap_weights(self.model, read_safetensors(model_dir))
        if version is not None:
            self.weight_version = version
        return count

    def swap_tensors(self, tensors: dict[str, torch.Tensor], version: str | None) -> int:
        """Swap in a whole set of weights (a staging file's views) between steps."""
        if self._live is None:  # the parameters' tensors stay the same objects: built once
            self._live = self.model.state_dict()
        count = swap_weights(self.model, tensors, self._live)
        if version is not None:
            self.weight_version = version
        return count

    def load_tensors(self, tensors: dict[str, torch.Tensor], version: str | None) -> int:
        """Copy some weights (one received bucket) in between steps; returns tensors loaded."""
        count = load_tensors(self.model, tensors)
        if version is not None:
            self.weight_version = version
        return count

    def _drop(self, keys: set[int]) -> dict[int, str]:
        if not keys:
            return {}
        texts: dict[int, str] = {}
        keep = []
        for i, row in enumerate(self._rows):
            if row.admission.key in keys:
                spec = row.sampler.spec
                texts[row.admission.key] = final_text(
                    self.codec,
                    row.output_ids,
                    None,
                    skip_special_tokens=spec.skip_special_tokens,
                    no_stop_trim=spec.no_stop_trim,
                )
            else:
                keep.append(i)
        self._batch.select(keep)
        self._rows = [self._rows[i] for i in keep]
        return texts

    def _prefill(
        self, admits: list[Admission]
    ) -> tuple[list[_Row], torch.Tensor | None, dict[int, InputLogprobs]]:
        if not admits:
            return [], None, {}
        want_inputs = any(a.logprobs.input_start >= 0 for a in admits)
        prompts = [a.prompt_ids + a.output_ids for a in admits]
        done = DecodeBatch.prefill(self.forward, prompts, all_logits=want_inputs)
        self._batch.extend(done.batch)
        rows = []
        for a, prompt in zip(admits, prompts, strict=True):
            spec = a.sampling
            sampler = RowSampler.create(
                spec, eos_ids=self.eos_ids, prompt=prompt, vocab=self.vocab_size
            )
            for token in a.output_ids:
                sampler.observe(token)
            text = None
            if a.wants_text or spec.stop:
                text = IncrementalText(self.codec, skip_special_tokens=spec.skip_special_tokens)
                if a.output_ids:
                    text.advance(a.output_ids)
            rows.append(
                _Row(admission=a, sampler=sampler, output_ids=list(a.output_ids), text=text)
            )
        inputs = {}
        if done.all_logits is not None:
            for i, a in enumerate(admits):
                if a.logprobs.input_start >= 0 and not a.output_ids:
                    inputs[a.key] = self._input_logprobs(a, done.all_logits[i], len(prompts[i]))
        return rows, done.last_logits, inputs

    def _input_logprobs(self, a: Admission, logits: torch.Tensor, length: int) -> InputLogprobs:
        """Log-probs of prompt positions ``input_start..`` (position 0 has none), ``[L, V]``."""
        temp = 1.0 if a.sampling.greedy else a.sampling.temperature
        width = logits.shape[0]
        own = logits[width - length :].float() / temp
        logprobs = torch.log_softmax(own[:-1], dim=-1)
        prompt = torch.tensor(a.prompt_ids, device=logprobs.device)
        chosen = logprobs.gather(-1, prompt[1:, None])[:, 0]
        tokens: list[LogprobEntry] = [(None, a.prompt_ids[0])]
        tokens += _entries(chosen, prompt[1:])
        top: list[list[LogprobEntry] | None] = [None]
        by_ids: list[list[LogprobEntry] | None] = [None]
        for pos in range(length - 1):
            top.append(self._top(logprobs[pos], a.logprobs.top_n))
            by_ids.append(self._by_ids(logprobs[pos], a.logprobs.token_ids))
        start = a.logprobs.input_start
        return InputLogprobs(tokens=tokens[start:], top=top[start:], by_ids=by_ids[start:])

    @staticmethod
    def _top(logprobs: torch.Tensor, n: int) -> list[LogprobEntry] | None:
        if n <= 0:
            return None
        values, ids = logprobs.topk(min(n, logprobs.shape[-1]))
        return _entries(values, ids)

    @staticmethod
    def _by_ids(logprobs: torch.Tensor, token_ids: tuple[int, ...]) -> list[LogprobEntry] | None:
        if not token_ids:
            return None
        ids = torch.tensor(token_ids, device=logprobs.device)
        return _entries(logprobs[ids], ids)

    def _advance(
        self, rows: list[_Row], logits: torch.Tensor, inputs: dict[int, InputLogprobs]
    ) -> list[RowOutput]:
        """Draw a token for every row, record it, and remove the rows that finished."""
        drawn = draw(logits, [r.sampler for r in rows], [len(r.output_ids) for r in rows])
        self._batch.last = drawn.tokens
        tokens = drawn.tokens.tolist()
        token_lps = drawn.token_logprobs.tolist()
        finishes: list[FinishReason | None] = []
        endings: dict[int, Ending] = {}
        for i, row in enumerate(rows):
            spec = row.sampler.spec
            if spec.max_new_tokens == 0:
                finishes.append(finish_length(0))
                continue
            row.output_ids.append(tokens[i])
            row.sampler.observe(tokens[i])
            added = row.text.advance(row.output_ids) if row.text is not None else ""
            finish = self._finish(row, tokens[i], added)
            finishes.append(finish)
            if finish is not None:
                endings[i] = Ending(
                    row.output_ids,
                    finish,
                    skip_special_tokens=spec.skip_special_tokens,
                    no_stop_trim=spec.no_stop_trim,
                )
        texts = dict(zip(endings, final_texts(self.codec, list(endings.values())), strict=True))
        outputs = []
        for i, row in enumerate(rows):
            key = row.admission.key
            if row.sampler.spec.max_new_tokens == 0:
                out = RowOutput(
                    key=key,
                    token=None,
                    text="",
                    finish=finishes[i],
                    input_logprobs=inputs.get(key),
                )
            else:
                text = texts.get(i)
                if text is None and row.admission.wants_text and row.text is not None:
                    text = row.text.text
                out = self._row_output(
                    row, tokens[i], token_lps[i], drawn.logprobs, i, inputs, finishes[i], text
                )
            outputs.append(out)
        keep = [i for i, finish in enumerate(finishes) if finish is None]
        self._rows = [rows[i] for i in keep]
        self._batch.select(keep)
        return outputs

    def _row_output(
        self,
        row: _Row,
        token: int,
        logprob: float,
        all_logprobs: torch.Tensor,
        index: int,
        inputs: dict[int, InputLogprobs],
        finish: FinishReason | None,
        text: str | None,
    ) -> RowOutput:
        want = row.admission.logprobs
        key = row.admission.key
        if not want.enabled:
            return RowOutput(key=key, token=token, text=text, finish=finish)
        top = by_ids = None
        if want.top_n > 0 or want.token_ids:
            logprobs = all_logprobs[index]
            top = self._top(logprobs, want.top_n)
            by_ids = self._by_ids(logprobs, want.token_ids)
        return RowOutput(
            key=key,
            token=token,
            logprob=logprob,
            top=top,
            by_ids=by_ids,
            text=text,
            finish=finish,
            input_logprobs=inputs.get(key) if inputs else None,
        )

    @staticmethod
    def _finish(row: _Row, token: int, added: str) -> FinishReason | None:
        spec = row.sampler.spec
        made = len(row.output_ids)
        if made >= spec.max_new_tokens:
            return finish_length(spec.max_new_tokens)
        if token in row.sampler.stop_ids and made >= spec.min_new_tokens:
            return finish_stop(token)
        if row.text is None:
            return None
        stop = find_stop(row.text.text, added, spec.stop)
        if stop is not None and made >= spec.min_new_tokens:
            return finish_stop(stop)
        return None
