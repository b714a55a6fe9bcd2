"""One trial of a sweep as a real run: ``mm-ptft train`` in a child process (1 rank, or N under torchrun / the
deepspeed launcher), its own ``metrics.jsonl`` read as it grows, stopped as a process group.

The child leads a new session (its launcher's ranks and DataLoader workers share its process group), so stopping a
trial signals every process of the run at once: SIGTERM, then SIGKILL after a grace period. On Linux the child also
asks for SIGTERM when the sweep's process dies (``PR_SET_PDEATHSIG``), so a sweep killed with SIGKILL does not leave
its trial training on; launchers pass that SIGTERM on to their ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCHERS = ("torchrun", "deepspeed")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    found = str(local) if local.is_file() else shutil.which("deepspeed")
    if found is None:
        from mm_ptft.sweep.space import SweepError

        raise SweepError("sweep: --launcher deepspeed: no `deepspeed` launcher beside this Python or on PATH")
    return found


def trial_command(base: str | Path, overrides: list[str], ranks: int = 1, launcher: str = "torchrun") -> list[str]:
    """argv of one trial: ``mm-ptft train -c BASE overrides…`` on 1 process, or under a launcher for N ranks (on a
    free port of this machine)."""
    train = ["train", "--config", str(base), *overrides]
    if ranks == 1:
        return [sys.executable, "-m", "mm_ptft", *train]
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        return [*head, "--master-port", str(free_port()), "-m", "mm_ptft", *train]
    if launcher == "deepspeed":
        head = [_deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port())]
        return [*head, "--module", "mm_ptft", *train]
    raise ValueError(f"unknown launcher '{launcher}' ({', '.join(LAUNCHERS)})")


# a process group's coordinates: a trial makes its own (a single process picks a free port, a launcher sets them);
# inherited from a parent that trained in-process, they name a port that parent still holds
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def trial_env(ranks: int) -> dict[str, str]:
    """The child's environment: this mm_ptft first on the path, unbuffered output, one thread per rank when the
    ranks share the cores (2 ranks × 1 thread beat 1 × 2 here), quiet tokenizers, no inherited process group."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if ranks > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the sweep's process ends (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def eval_records(lines: list[str]) -> list[dict]:
    """The ``kind == "eval"`` records among complete ``metrics.jsonl`` lines (damaged lines are skipped)."""
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("kind") == "eval":
                out.append(record)
    return out


class TrialProcess:
    """A running trial: its child process (group), log file and the part of its ``metrics.jsonl`` read so far."""

    def __init__(self, argv: list[str], run_dir: Path, env: dict[str, str] | None = None):
        self.argv, self.run_dir, self.env = argv, Path(run_dir), env
        self.log_path = self.run_dir / "train.log"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.proc: subprocess.Popen | None = None
        self._offset = 0  # bytes of metrics.jsonl consumed (complete lines only)
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> TrialProcess:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # its own process group: stop() reaches the launcher's ranks too
                preexec_fn=_die_with_parent,
            )
        self.started = time.monotonic()
        return self

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    def new_evals(self) -> list[dict]:
        """Eval records appended to ``metrics.jsonl`` since the last call (a partly written last line waits)."""
        if not self.metrics_path.is_file():
            return []
        with self.metrics_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        return eval_records(data[:end].decode("utf-8", errors="replace").splitlines())

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the trial's process group, SIGKILL after ``grace_s``; returns the child's exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        self._signal_group(signal.SIGKILL)  # ranks or workers the launcher left behind
        return self.proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def last_error_line(log_tail: str) -> str:
    """The line of a failed run's log that says why: its ``error: …`` line, else the last non-empty one."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error:" in line]
    return (errors or lines or ["(no output)"])[-1][:500]


def leftover_alive(pid: int | None, marker: str) -> bool:
    """Whether process ``pid`` still runs and is a trial of this sweep (its command line holds ``marker``)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and marker in cmdline


def kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        time.sleep(0.5 if sig == signal.SIGTERM else 0)
