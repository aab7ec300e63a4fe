"""One run of a suite: train it (or reuse it), evaluate it on a split, read it at each task's own best
step, and measure its footprint. Every result is cached beside the run, so a report resumes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from unirec.experiments.suites import Suite, compose


def train(
    suite: Suite,
    tasks: Optional[Sequence[str]],
    lr: float,
    size: str,
    seed: int,
    run_dir: Path,
    args,
    extra: Sequence[str] = (),
) -> Dict:
    """Train (or reuse) one run; returns its metrics.json plus the wall time. ``extra``: further overrides
    (after the suite's, the learning rate, the size and the seed)."""
    from omegaconf import OmegaConf

    from unirec.data.prepare import prepare
    from unirec.train import run

    done = run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it over (its data set is cached)
    patience = [f"trainer.patience={args.patience}"] if getattr(args, "patience", None) else []
    trainer = [f"trainer.epochs={suite.epochs}", "trainer.best_metric=mean/ndcg@10", "trainer.keep_checkpoints=1",
               "trainer.progress=false", "trainer.log_every=100", *patience]  # fmt: skip
    cfg = compose(suite, tasks, lr, size, seed, [*extra, *trainer])
    features = prepare(cfg.data, cfg.task, cfg.seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    t0 = time.perf_counter()
    run(cfg, run_dir, features)
    wall = time.perf_counter() - t0
    metrics = json.loads(done.read_text())
    metrics["wall_seconds"] = round(wall, 2)
    done.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def start_helpers(script: str, args, argv) -> list:
    """``--jobs N``: N-1 helper processes of ``script`` with the same arguments plus ``--helper``, every
    process (this one too) with ``cpu_count // N`` torch threads. Returns (process, log path) pairs for
    :func:`wait_helpers`; the logs lie in ``args.work``."""
    if args.jobs <= 1:
        return []
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    # Not --fresh (the scripts also ignore it in a helper): this process has emptied the work directory
    # already; a helper doing it again would delete the runs this one has started meanwhile.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = []
    for i in range(1, args.jobs):
        path = Path(args.work) / f"helper-{i}.log"
        with open(path, "w") as log:
            cmd = [sys.executable, str(Path(script).resolve()), *argv, "--helper"]
            out.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), path))
    print(f"--jobs {args.jobs}: {args.jobs - 1} helper(s), {threads} torch thread(s) each; logs {args.work}/helper-*.log",
          flush=True)  # fmt: skip
    return out


@contextlib.contextmanager
def helpers(script: str, args, argv, start: bool = True):
    """:func:`start_helpers` around the first process's work: on leaving, waits for them (exits naming the
    log of one that failed); if that work raised, stops them instead, so none trains on unattended."""
    procs = start_helpers(script, args, argv) if start else []
    try:
        yield procs
    except BaseException:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait()
        raise
    wait_helpers(procs)


def wait_helpers(procs) -> None:
    """Wait for the processes of :func:`start_helpers`; exits naming the log of one that failed."""
    for proc, path in procs:
        if proc.wait() != 0:
            sys.exit(f"a --jobs helper failed (exit {proc.returncode}); its log: {path}")


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = True):
    """An exclusive lock on one run (a file beside its directory), so processes sharing a work directory
    (``--jobs``, ``--only-seeds``) never train or evaluate the same run at once. Yields True once held;
    with ``wait=False`` it yields False at once where another process holds it."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluate(
    run_dir: Path, split: str, protocols: Sequence[str], baselines: bool = False, baseline_cache=None
) -> Dict:
    """Per protocol -> {model, popularity} -> task -> metrics, cached beside the run; the baselines' figures
    also under ``baseline_cache``, shared by the seeds whose data give them the same inputs."""
    from unirec.evaluate import run as eval_run

    baselines = baselines and "full" in protocols  # popularity over all canvases and BPR-MF
    cache = run_dir / f"eval-{split}-{'-'.join(protocols)}{'-baselines' if baselines else ''}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    res = eval_run(
        run_dir, split, protocols, checkpoint="best", baselines=baselines, baseline_cache=baseline_cache
    )
    cache.write_text(json.dumps(res, indent=2, sort_keys=True))
    return res


def per_task(run_dir: Path, tasks: Sequence[str], protocols: Sequence[str]) -> Dict:
    """A unified run as environments that each serve their own task's best step (``best:<task>``, as
    ``python -m unirec.export RUN --checkpoint best:<task>`` exports it): which checkpoint each task takes
    and, for every checkpoint other than the best-mean one, the model's test figures there (the best-mean
    checkpoint's are the run's own evaluation). Cached beside the run."""
    from unirec.evaluate import run as eval_run
    from unirec.export import ArtifactError, checkpoint_dir

    cache = run_dir / f"eval-test-per-task-{'-'.join(protocols)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    best = checkpoint_dir(run_dir, "best").name
    steps = {}
    for t in tasks:
        try:
            steps[t] = checkpoint_dir(run_dir, f"best:{t}").name
        except ArtifactError:  # a run from before per-task pointers: its best-mean checkpoint
            steps[t] = best
    out: Dict = {"best": best, "steps": steps, "figures": {}}
    for step in sorted(set(steps.values()) - {best}):
        mine = [t for t in tasks if steps[t] == step]  # only the tasks served from this step
        res = eval_run(run_dir, "test", protocols, checkpoint=step, popularity=False, tasks=mine)
        out["figures"][step] = {p: res["protocols"][p]["model"] for p in protocols}
    cache.write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def at_own_step(res: Dict, protocol: str, task: str) -> Dict:
    """A unified run's figures for ``task`` at the checkpoint best for it (:func:`per_task`)."""
    own = res["per_task"]
    step = own["steps"][task]
    if step == own["best"]:
        return res["protocols"][protocol]["model"][task]
    return own["figures"][step][protocol][task]


def headline(res: Dict, suite: Suite, task: str, who: str = "model") -> float:
    return res["protocols"][suite.headline][who][task]["ndcg@10"]


# ---------------------------------------------------------------------------------------------- footprint


# The process's own peak RSS in MB: VmHWM, not getrusage's ru_maxrss, which Linux carries over from the
# parent across fork and exec (the child would report this script's peak).
_PEAK_RSS = (
    "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
)


def footprint(run_dir: Path, registry: Path) -> Dict:
    """Artifact bytes and the serving process's peak RSS for the run's chosen checkpoint."""
    from unirec.export import export

    marker = run_dir / "artifact.json"
    if marker.exists():
        return json.loads(marker.read_text())
    art = export(run_dir, registry, "best")
    size = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
    code = f"import sys\nfrom unirec.serve.scorer import Scorer\ns = Scorer.load(sys.argv[1])\n{_PEAK_RSS}"
    out = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, check=True)
    info = {"artifact": str(art), "artifact_bytes": size, "serving_rss_mb": float(out.stdout.strip())}
    marker.write_text(json.dumps(info))
    return info


def bare_rss_mb() -> float:
    """Peak RSS of a process that imports the serving code and loads nothing: the per-process floor."""
    code = f"import unirec.serve.scorer\n{_PEAK_RSS}"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
