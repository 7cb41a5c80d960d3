"""A local judge for the duration of a stage: vLLM's OpenAI-compatible server on 127.0.0.1.

`serve_judge(model_dir, ...)` starts `python -m vllm.entrypoints.openai.api_server` with the
Python of the vLLM environment (`.vllm-venv`, made by `make vllm-env`, or $TAXFREE_VLLM_VENV; vLLM
pins its own torch, so it never enters the main environment), on a free port bound to 127.0.0.1 only, its output
in a log file, and yields the base URL once the server lists its models. On leaving, the
server's process group gets SIGTERM, then SIGKILL if it has not exited within 30 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from taxfree.errors import TaxfreeError

VLLM_VENV = ".vllm-venv"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_venvs() -> list[Path]:
    """Where the vLLM environment is looked for: $TAXFREE_VLLM_VENV if set, else `.vllm-venv` in
    the working directory, then in the repository."""
    if os.environ.get("TAXFREE_VLLM_VENV"):
        return [Path(os.environ["TAXFREE_VLLM_VENV"])]
    return [Path.cwd() / VLLM_VENV, Path(__file__).resolve().parents[3] / VLLM_VENV]


def vllm_python() -> Path | None:
    """The vLLM environment's Python, or None when there is none."""
    for venv in vllm_venvs():
        if (venv / "bin" / "python").is_file():
            return venv / "bin" / "python"
    return None


def require_vllm_python() -> Path:
    python = vllm_python()
    if python is None:
        raise TaxfreeError(f"evaluate.judge.serve: the vLLM environment ({vllm_venvs()[0]}) does not exist: "
                           "run `make vllm-env` (or give evaluate.judge.endpoint instead)")
    return python


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(python: str | os.PathLike, model_dir: str, served_name: str, port: int,
                  extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [str(python), "-m", SERVER_MODULE, "--model", model_dir, "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(port), *extra_args]


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def _ready(url: str) -> bool:
    import openai

    client = openai.OpenAI(base_url=url, api_key="no-key", timeout=5.0, max_retries=0)
    try:
        client.models.list()
        return True
    except openai.OpenAIError:
        return False
    finally:
        client.close()


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve_judge(model_dir: str, served_name: str, log_path: str | os.PathLike, extra_args=(),
                timeout_s: float = 1800.0, python: str | os.PathLike | None = None) -> Iterator[str]:
    """Run a local OpenAI-compatible server for `model_dir` as `served_name`; yields its base URL."""
    python = python or require_vllm_python()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = serve_command(python, model_dir, served_name, port, list(extra_args))
    with open(log_path, "ab") as log:
        log.write(f"\n[taxfree] {' '.join(cmd)}\n".encode("utf-8"))
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not _ready(url):
                if proc.poll() is not None:
                    raise TaxfreeError(f"judge server exited with code {proc.returncode} before it was ready "
                                       f"(log: {log_path}: {_last_line(log_path)})")
                if time.monotonic() > deadline:
                    raise TaxfreeError(f"judge server not ready after {timeout_s:g} s (evaluate.judge.serve_timeout_s; "
                                       f"log: {log_path})")
                time.sleep(1.0)
            yield url
        finally:
            _stop(proc)
