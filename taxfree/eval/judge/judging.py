"""Asking the judge many questions at once, each exactly once.

A `Job` is one judgement: the conversation shown to the judge and how to read its reply. Its
cache key covers everything the judgement depends on: the evaluated model's identity, the
benchmark, item and turn, the judge model, its sampling settings and the full conversation (the
prompt template with the question, the answer and any reference filled in), so a changed answer
or template is judged again and nothing else is.

`run_jobs` sends the jobs not in the store, at most `max_concurrency` at a time. A reply that
does not parse is asked again up to `max_retries` times; then the last reply is recorded as a
failure. A request the endpoint rejects is recorded as a failure with the error. Each outcome
is appended to the store the moment it is known.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from taxfree.eval.judge.client import JudgeClient, JudgeRejected
from taxfree.eval.judge.store import JsonlStore, cache_key

UNPARSEABLE = "unparseable reply"


@dataclass
class Job:
    benchmark: str
    item: int | str
    turn: int
    messages: list[dict]
    parse: Callable[[str], object]  # reply -> verdict, or None when it does not parse
    prompt: str  # the judge prompt's name


def prompt_digest(messages: list[dict]) -> str:
    """sha256 of the judge conversation (stored with each judgement, for audits)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def job_key(job: Job, identity, client: JudgeClient) -> str:
    return cache_key({"model": identity, "benchmark": job.benchmark, "item": job.item, "turn": job.turn,
                      "judge": client.model, "temperature": client.temperature, "max_tokens": client.max_tokens,
                      "messages": job.messages})


def _judge_one(job: Job, key: str, client: JudgeClient, max_retries: int) -> dict:
    entry = {"key": key, "benchmark": job.benchmark, "item": job.item, "turn": job.turn, "prompt": job.prompt,
             "judge": client.model, "prompt_sha256": prompt_digest(job.messages)}
    reply = None
    for attempt in range(1, max_retries + 2):
        try:
            reply = client.ask(job.messages)
        except JudgeRejected as e:
            return {**entry, "verdict": None, "failure": str(e), "reply": None, "attempts": attempt, "time": time.time()}
        verdict = job.parse(reply)
        if verdict is not None:
            return {**entry, "verdict": verdict, "failure": None, "reply": reply, "attempts": attempt, "time": time.time()}
    return {**entry, "verdict": None, "failure": UNPARSEABLE, "reply": reply, "attempts": max_retries + 1,
            "time": time.time()}


def run_jobs(jobs: list[Job], identity, client: JudgeClient, store: JsonlStore, max_concurrency: int,
             max_retries: int, desc: str = "judging") -> list[dict]:
    """The store's entry of every job, in order, asking the judge only for the missing ones."""
    from tqdm.auto import tqdm

    keys = [job_key(j, identity, client) for j in jobs]
    todo = {}
    for job, key in zip(jobs, keys):
        if key not in store and key not in todo:
            todo[key] = job
    if todo:
        bar = tqdm(total=len(todo), desc=f"{desc} ({len(jobs) - len(todo)} cached)", unit="call")
        pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="judge")
        error: BaseException | None = None

        def collect(done) -> None:
            nonlocal error
            for f in done:
                if f.cancelled():
                    continue
                try:
                    entry = f.result()
                except BaseException as e:  # JudgeUnavailable: stop asking, keep what is done
                    error = error or e
                    continue
                store.add(entry)
                bar.update()

        try:
            futures = {pool.submit(_judge_one, job, key, client, max_retries) for key, job in todo.items()}
            while futures and error is None:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)  # each stored as it finishes
                collect(done)
            if futures:  # stopped early: cancel what has not started, keep what finishes
                pool.shutdown(wait=True, cancel_futures=True)
                collect(futures)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        if error is not None:
            raise error
    return [store.get(k) for k in keys]
