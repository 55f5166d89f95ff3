# Docs: docs/install-gpu-offline.md and docs/performance.md ("GPU")
"""A short GPU session as one command: install, GPU tests, benchmark, a short paper-size run, kill and resume, report.

    python3 experiments/gpu_session.py --out gpu-report          # on a GPU node, with wheels-gpu/ next to the code
    python experiments/gpu_session.py --out /tmp/dry --dry-run   # the same phases at tiny sizes on the CPU, no install

Every phase is time-boxed: it gets its own box plus whatever the phases before it left unused, and stops (the
process group is killed) when that runs out, so a slow phase cannot eat the later ones. The default budget, 570 s,
keeps the command inside a 10-minute limit per command. Phases, in order:

    install      a venv that sees the node's torch (--system-site-packages), the wheels of
                 experiments/make_gpu_wheels.sh installed with --no-index, pip check, an import check
    environment  nvidia-smi, pip list, torch and its CUDA, whether wandb and pytest-xdist are there
    dataset      (in the background from here on) maze2d-large generated locally, --dataset-steps steps
    tests        the GPU acceptance tests that fit: those that need CUDA and every kill/resume test, on --device cuda
    benchmark    tests/benchmark.py at the paper's sizes: denoiser, sampler fp32/bf16, rollout step, TD3+BC update
                 eager and with CUDA graphs, the projected 1M-step run, narrower U-Nets
    compiled     tests/benchmark.py's torch.compile'd bf16 denoiser: forward and sampler
    pretrain     pretrain_models.py on maze2d-large: the paper's U-Net, a few hundred DM steps
    run          dydiff_td3bc.py on maze2d-large with the paper's B_r 2048, L 100, N 34: 1,500 steps, 3 rollout steps
    resume       the same run killed (SIGKILL) after its first checkpoint, resumed with --resume, compared

The report, report.md and report.json, lands in --out with every figure's command, the logs in --out/logs.
Datasets, models and runs go to --work (large files that need not come back). Standard library only: it runs
with the node's Python before anything is installed. Exit status 0 when every phase succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["install", "environment", "tests", "benchmark", "compiled", "pretrain", "run", "resume"]
OPTIONAL = ["tests", "benchmark", "compiled", "e2e"]  # what --phases picks from; e2e = pretrain, run and resume
# Seconds per phase on a GPU (560: the default budget less REPORT_S and 5 s to spare); scaled down to a smaller --budget.
GPU_BOXES = dict(install=50, environment=15, tests=125, benchmark=120, compiled=70, pretrain=75, run=45, resume=55)
DRY_BOXES = dict(install=120, environment=60, tests=120, benchmark=300, compiled=240, pretrain=240, run=180, resume=240)
DATASET_BOX_S = 240  # the background generation's own limit, from its start
REPORT_S = 5
SECTIONS = [
    "## Time boxes",
    "## Environment",
    "## Install",
    "## GPU tests",
    "## Benchmark at the paper's sizes",
    "## End-to-end run on maze2d-large",
    "## Kill and resume",
    "## Files",
]
# The short run: rollouts at steps 0, 500, 1000; evaluations (and checkpoints) at 750 and 1500; the rate logged at
# 1000 and 1500 brackets 500 updates and one rollout, no evaluation.
RUN_STEPS = ["--total-steps", "1500", "--eval-freq", "750", "--rollout-freq", "500"]
TINY_MODELS = (
    "--dm-dim 8 --dm-dim-mults 1 2 --dm-batch-size 16 --dyn-hidden 32 --dyn-max-steps 40 "
    "--reward-steps 40 --report-windows 4 --report-iterations 1 --holdout-fraction 0.1"
).split()
EXPECTED_MISSING = ("mujoco-studio", "pyopengl")  # MuJoCo's viewer, left out of the wheel folder on purpose


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the report (report.md, report.json, logs/)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, no install (what CI runs)")
    p.add_argument("--wheels", default=str(ROOT / "wheels-gpu"), help="the folder of experiments/make_gpu_wheels.sh")
    p.add_argument(
        "--install",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make the venv and install the wheels (default: yes, but not with --dry-run or --python)",
    )
    p.add_argument("--python", help="run the phases with this interpreter, nothing installed")
    p.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "dydiff-gpu-venv"), help="the venv to make")
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "dydiff-gpu-work"),
        help="Minari store, models and runs of the session (kept out of --out: they are large)",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole session (default 570; dry run 1500)")
    p.add_argument(
        "--phases",
        nargs="+",
        choices=OPTIONAL,
        default=OPTIONAL,
        help="what to run besides install and environment (default: all)",
    )
    p.add_argument("--dataset-steps", type=int, default=None, help="maze2d-large steps (default 200,000; dry run 10,000)")
    p.add_argument("--dm-steps", type=int, default=None, help="DM training steps of the short run (default 500)")
    p.add_argument("--all-tests", action="store_true", help="the whole suite instead of the CUDA and kill/resume tests")
    p.add_argument(
        "--jobs", type=int, default=None, help="pytest-xdist workers when it is installed (default: CPUs / 2, at most 8)"
    )
    args = p.parse_args(argv)
    if args.install is None:
        args.install = not (args.dry_run or args.python)
    if args.budget is None:
        args.budget = 1500.0 if args.dry_run else 570.0
    if args.dataset_steps is None:
        args.dataset_steps = 10_000 if args.dry_run else 200_000
    if args.dm_steps is None:
        args.dm_steps = 20 if args.dry_run else 500
    return args


# ---------------------------------------------------------------------------------------------- running things


class Session:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.work = Path(args.work).resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        boxes = DRY_BOXES if args.dry_run else GPU_BOXES
        planned = ["install", "environment", *[p for p in PHASES[2:] if self.wanted(p)]]
        scale = min(1.0, (args.budget - REPORT_S) / sum(boxes[p] for p in planned))
        self.boxes = {p: boxes[p] * scale for p in planned}
        self.planned = planned
        self.phases = {p: dict(status="not run", box_s=round(self.boxes[p], 1), commands=[]) for p in planned}
        self.python = args.python or sys.executable
        self.env = dict(
            os.environ,
            DYDIFF_OFFLINE="1",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            MINARI_DATASETS_PATH=str(self.work / "minari"),
        )
        self.env.pop("PYTHONHASHSEED", None)
        self.results = {}
        self.background = {}

    def wanted(self, phase):
        wanted = set(self.args.phases)
        return (
            phase in ("install", "environment")
            or phase in wanted
            or (phase in ("pretrain", "run", "resume") and "e2e" in wanted)
        )

    def elapsed(self):
        return time.monotonic() - self.start

    def say(self, text):
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def phase_timeout(self, phase):
        """Its box plus what earlier phases left: the time to the deadline less the boxes of the phases after it."""
        later = sum(self.boxes[p] for p in self.planned[self.planned.index(phase) + 1 :])
        return self.deadline - REPORT_S - later - time.monotonic()

    def display(self, cmd):
        """A command as the report shows it: `python` for the session's interpreter, $OUT and $WORK for those folders,
        paths in the repository relative to it, and the inline scripts of this file by their names."""
        out = []
        for c in map(str, cmd):
            c = "python" if c == self.python else INLINE.get(c, c)
            if c.startswith(str(ROOT) + os.sep) and not c.startswith((str(self.out), str(self.work))):
                c = c[len(str(ROOT)) + 1 :]
            out.append(c)
        text = shlex.join(out)
        for base, name in sorted(((str(self.out), "$OUT"), (str(self.work), "$WORK")), key=lambda x: -len(x[0])):
            text = text.replace(base, name)
        return re.sub(r"'(\$[A-Z]+)", r"\1'", text)  # '$OUT/a b' -> $OUT'/a b': the variable still expands

    def run(self, phase, name, cmd, timeout, env=None, split=False):
        """Run cmd with its output in logs/{phase}-{name}.log (stderr in logs/{phase}-{name}.stderr.log if `split`);
        a record with rc, seconds, whether it timed out, and the output (stdout alone if `split`)."""
        log, err = self.logs / f"{phase}-{name}.log", self.logs / f"{phase}-{name}.stderr.log"
        rec = dict(command=self.display(cmd), log=str(log.relative_to(self.out)))
        self.phases[phase]["commands"].append(rec["command"])
        t0 = time.monotonic()
        if timeout <= 1:
            rec.update(rc=None, seconds=0.0, timed_out=True, output="", stderr="")
            return rec
        with open(log, "w") as f, open(err if split else os.devnull, "w") as e:
            if not split:
                f.write(f"$ {rec['command']}\n")
                f.flush()
            proc = subprocess.Popen(
                list(map(str, cmd)),
                cwd=ROOT,
                env=env or self.env,
                stdout=f,
                stderr=e if split else subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                stop(proc)
                rc, timed_out = None, True
            except BaseException:  # this session stopped (SIGTERM, Ctrl-C): its child goes too
                stop(proc)
                raise
        rec.update(
            rc=rc,
            seconds=round(time.monotonic() - t0, 2),
            timed_out=timed_out,
            output=log.read_text(errors="replace"),
            stderr=err.read_text(errors="replace") if split else "",
        )
        return rec

    def phase(self, name, fn):
        """Run one phase under its time box; its status is ok, failed (with why), timed out or skipped."""
        if name not in self.phases:
            return
        rec = self.phases[name]
        timeout = self.phase_timeout(name)
        if timeout < 5:
            rec.update(status="skipped: no time left", seconds=0.0)
            self.say(f"{name}: skipped, no time left")
            return
        self.say(f"{name}: started (box {timeout:.0f} s)")
        t0 = time.monotonic()
        try:
            problem = fn(time.monotonic() + timeout)
        except Exception as e:  # a bug in one phase must not cost the report of the others
            problem = f"failed: {type(e).__name__}: {e}"
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["status"] = problem or "ok"
        self.say(f"{name}: {rec['status']} after {rec['seconds']:.0f} s")
        write_report(self)

    def left(self, until):
        return until - time.monotonic()


def stop(proc):
    """End a process and its children (its own session): SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def problem_of(rec, what):
    """None if the command succeeded, else a short reason."""
    if rec["timed_out"]:
        return f"timed out: {what} after {rec['seconds']:.0f} s"
    if rec["rc"] != 0:
        last = [line for line in (rec.get("stderr") or rec["output"]).splitlines() if line.strip()][-1:] or [""]
        return f"failed: {what} exited {rec['rc']} ({last[0][:200]})"
    return None


def last_json_line(text):
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return {}


# ---------------------------------------------------------------------------------------------- phases


def install(s: Session, until):
    a, r = s.args, s.results.setdefault("install", {})
    if not a.install:
        r["skipped"] = f"no install: the phases run with {s.python}"
        r["python"] = s.python
        return None
    venv = Path(a.venv).resolve()
    wheels = Path(a.wheels).resolve()
    py = venv / "bin" / "python"
    r.update(venv=str(venv), wheels=str(wheels))
    if not (wheels / "requirements.txt").exists():
        return f"failed: no {wheels}/requirements.txt; make the folder with experiments/make_gpu_wheels.sh"
    r["wheel_folder_mib"] = round(sum(f.stat().st_size for f in wheels.iterdir()) / 2**20, 1)
    r["wheel_count"] = len(list(wheels.glob("*.whl")))
    if venv.exists():
        shutil.rmtree(venv)
    rec = s.run("install", "venv", [sys.executable, "-m", "venv", "--system-site-packages", venv], s.left(until))
    own_pip = rec["rc"] == 0 and py.exists()
    if not own_pip:  # no ensurepip on this Python: a venv without pip, installed into by this Python's pip
        shutil.rmtree(venv, ignore_errors=True)
        rec = s.run(
            "install",
            "venv-without-pip",
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
            s.left(until),
        )
        if problem := problem_of(rec, "making the venv"):
            return problem
    pip = [py, "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python", py]
    s.python = str(py)
    if sys.prefix != sys.base_prefix:  # this Python is itself a venv (the node's torch is in it): the new venv's
        # --system-site-packages would see the base Python's packages only, so a .pth file adds this venv's too
        import site
        import sysconfig

        ours = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
        ours.mkdir(parents=True, exist_ok=True)
        (ours / "_node_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        r["node_site_packages"] = site.getsitepackages()
    rec = s.run(
        "install",
        "pip",
        [
            *pip,
            "install",
            "--disable-pip-version-check",
            "--no-index",
            "--no-deps",
            "--find-links",
            wheels,
            "-r",
            wheels / "requirements.txt",
        ],
        s.left(until),
    )
    r["pip_install_s"] = rec["seconds"]
    if problem := problem_of(rec, "pip install --no-index"):
        return problem
    rec = s.run("install", "pip-check", [*pip, "check", "--disable-pip-version-check"], s.left(until))
    lines = [line for line in rec["output"].splitlines()[1:] if line.strip()]
    r["pip_check"] = lines
    r["pip_check_unexpected"] = [line for line in lines if not any(m in line.lower() for m in EXPECTED_MISSING)]
    rec = s.run(
        "install",
        "imports",
        [py, "-c", 'import torch, gymnasium, gymnasium_robotics, mujoco, minari, tyro, h5py; print("imports ok")'],
        s.left(until),
    )
    return problem_of(rec, "the import check")  # pip check's findings are reported, not fatal: the imports decide


ENV_PROBE = """
import json, os, platform, torch
def has(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False
gpu = torch.cuda.is_available()
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, cuda_available=gpu,
    gpu=torch.cuda.get_device_name() if gpu else None,
    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
    cpus=os.cpu_count(), wandb=has("wandb"), xdist=has("xdist"),
    compiler=any(__import__("shutil").which(c) for c in ("cc", "gcc", "clang")))))
"""


def environment(s: Session, until):
    r = s.results.setdefault("environment", {})
    smi = shutil.which("nvidia-smi")
    if smi:
        rec = s.run("environment", "nvidia-smi", [smi], s.left(until))
        (s.out / "nvidia-smi.txt").write_text(rec["output"])
        rec = s.run(
            "environment",
            "nvidia-smi-query",
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            s.left(until),
        )
        r["nvidia_smi"] = rec["output"].splitlines()[-1] if rec["rc"] == 0 else None
    else:
        r["nvidia_smi"] = None
        (s.out / "nvidia-smi.txt").write_text("nvidia-smi: not found on PATH\n")
    rec = s.run("environment", "pip-list", [s.python, "-m", "pip", "list", "--disable-pip-version-check"], s.left(until))
    (s.out / "pip-list.txt").write_text(rec["output"])
    rec = s.run("environment", "torch", [s.python, "-c", ENV_PROBE], s.left(until))
    if problem := problem_of(rec, "the torch probe"):
        return problem
    r.update(last_json_line(rec["output"]))
    if not s.args.dry_run and not r.get("cuda_available"):
        return "failed: torch sees no CUDA device (the GPU phases would run on the CPU)"
    return None


def start_dataset(s: Session):
    """Generate maze2d-large in the background (CPU only), so it is ready when the short run needs it."""
    cmd = [s.python, "-m", "common.datasets", "maze2d-large", "--dataset-steps", s.args.dataset_steps, "--offline"]
    log = s.logs / "dataset.log"
    f = open(log, "w")
    f.write(f"$ {s.display(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(
        list(map(str, cmd)), cwd=ROOT, env=s.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )
    bg = s.background["dataset"] = dict(proc=proc, start=time.monotonic(), file=f, log=log, command=s.display(cmd))
    threading.Thread(target=lambda: (proc.wait(), bg.setdefault("end", time.monotonic())), daemon=True).start()
    s.say("dataset: generation started in the background")


def wait_dataset(s: Session, until):
    """The dataset job's record once it ended (or was stopped at its box or at `until`)."""
    bg = s.background.get("dataset")
    if bg is None:
        return None
    if "record" not in bg:
        limit = min(until, bg["start"] + DATASET_BOX_S)
        try:
            rc, timed_out = bg["proc"].wait(timeout=max(0.0, limit - time.monotonic())), False
        except subprocess.TimeoutExpired:
            stop(bg["proc"])
            rc, timed_out = None, True
        bg["file"].close()
        out = bg["log"].read_text(errors="replace")
        bg["record"] = dict(
            command=bg["command"],
            rc=rc,
            timed_out=timed_out,
            output=out,
            seconds=round(bg.get("end", time.monotonic()) - bg["start"], 1),
            log=str(bg["log"].relative_to(s.out)),
        )
        line = next((x for x in out.splitlines() if x.startswith("maze2d-large:")), "")
        m = re.search(r"\| ([\d,]+) steps, ([\d,]+) episodes", line)
        s.results["dataset"] = dict(
            command=bg["command"],
            seconds=bg["record"]["seconds"],
            summary=line,
            steps=int(m.group(1).replace(",", "")) if m else None,
        )
    return bg["record"]


OUTCOME = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"


def pytest_outcomes(text):
    """Test id -> outcome from pytest -v output, serial (`id PASSED`) or pytest-xdist (`[gw0] [ 5%] PASSED id`)."""
    outcomes = {}
    for line in text.splitlines():
        m = re.match(rf"^(tests/\S+::\S+) {OUTCOME}", line) or re.match(rf"^\[gw\d+\] \[\s*\d+%\] {OUTCOME} (tests/\S+)", line)
        if m:
            a, b = m.groups()
            test, outcome = (a, b) if a.startswith("tests/") else (b, a)
            outcomes[test] = outcome
    return outcomes


def tests(s: Session, until):
    a, env = s.args, s.results.get("environment", {})
    r = s.results.setdefault("tests", {})
    cmd = [s.python, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    if a.dry_run:  # a cheap selection with the same shape: the CUDA tests (skipped here) and one update test
        cmd += ["--device", "cpu", "tests/test_td3bc.py", "-k", "cuda or polyaks"]
    else:
        cmd += ["--device", "cuda"] + ([] if a.all_tests else ["-k", "cuda or resume"])
    jobs = a.jobs or min(8, max(1, (env.get("cpus") or 2) // 2))
    if env.get("xdist") and jobs > 1 and not a.dry_run:
        cmd += ["-n", str(jobs)]
    env_tests = dict(s.env)
    env_tests.pop("MINARI_DATASETS_PATH", None)  # the tests make their own store
    rec = s.run("tests", "pytest", cmd, s.left(until), env=env_tests)
    outcomes = pytest_outcomes(rec["output"])
    counts = {
        k.lower(): list(outcomes.values()).count(k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED") if k in outcomes.values()
    }
    summary = next((x.strip("= ") for x in reversed(rec["output"].splitlines()) if re.match(r"^=+ .* in [\d.]+s", x)), None)
    r.update(
        command=rec["command"],
        seconds=rec["seconds"],
        counts=counts,
        summary=summary,
        failed=[t for t, o in outcomes.items() if o in ("FAILED", "ERROR")],
        outcomes=outcomes,
        timed_out=rec["timed_out"],
        workers=jobs if "-n" in cmd else 1,
    )
    if rec["timed_out"]:
        return f"timed out after {rec['seconds']:.0f} s ({len(outcomes)} tests finished)"
    if rec["rc"] != 0:
        return f"failed: {', '.join(r['failed']) or 'pytest exited ' + str(rec['rc'])}"
    return None


def benchmark_flags(s: Session):
    if s.args.dry_run:  # test_benchmark.py's tiny sizes
        return (
            "--size small --no-cuda --bf16 on --dm-dim 8 --dm-dim-mults 1 2 --rollout-batch-size 16 --rollout-length 12 "
            "--sampler-steps 3 --repeats 1 --dm-train-steps 10 --eval-episodes 2"
        ).split()
    return ["--size", "full", "--repeats", "2"]  # 2 timed repetitions, not 3: the session's time box


def benchmark(s: Session, until):
    out = s.out / "benchmark.json"
    sections = "forward sampler rollout update projection denoisers".split()
    cmd = [s.python, "tests/benchmark.py", *benchmark_flags(s), "--no-compile", "--sections", *sections, "--json-out", out]
    rec = s.run("benchmark", "core", cmd, s.left(until), split=True)
    (s.out / "benchmark.md").write_text(rec["output"])
    figures = json.loads(out.read_text()) if out.exists() else None
    s.results["benchmark"] = dict(command=rec["command"], seconds=rec["seconds"], figures=figures)
    return problem_of(rec, "tests/benchmark.py")


def compiled(s: Session, until):
    """The compiled bf16 denoiser alone (the eager ones are in the benchmark phase). The dry run measures the same
    command without torch.compile: compiling takes minutes on a CPU (tests/test_edm.py tests compiled sampling)."""
    out = s.out / "benchmark-compiled.json"
    variant = ["--no-compile", "--variants", "bf16 eager"] if s.args.dry_run else ["--variants", "bf16 compiled"]
    cmd = [
        s.python,
        "tests/benchmark.py",
        *benchmark_flags(s),
        "--sections",
        "forward",
        "sampler",
        *variant,
        "--json-out",
        out,
    ]
    rec = s.run("compiled", "sampler", cmd, s.left(until), split=True)
    (s.out / "benchmark-compiled.md").write_text(rec["output"])
    figures = json.loads(out.read_text()) if out.exists() else None
    s.results["compiled"] = dict(command=rec["command"], seconds=rec["seconds"], variant=variant[-1], figures=figures)
    return problem_of(rec, "tests/benchmark.py with torch.compile")


def data_flags(s: Session):
    return ["--env-id", "maze2d-large", "--dataset-steps", str(s.args.dataset_steps)]


def pretrain(s: Session, until):
    rec = wait_dataset(s, until)
    if rec is None:
        return "failed: the dataset was not started"
    if problem := problem_of(rec, "generating maze2d-large"):
        return problem
    models = s.work / "models"
    shutil.rmtree(models, ignore_errors=True)
    cmd = [s.python, "pretrain_models.py", *data_flags(s), "--models-dir", models, "--dm-steps", str(s.args.dm_steps)]
    if s.args.dry_run:
        cmd += "--preset cpu --no-cuda --rollout-length 16 --sampler-steps 4".split() + TINY_MODELS
    else:  # the paper's U-Net (128 x 1-4-8), L 100, N 34; short ensemble and reward fits, a small model report
        cmd += "--dyn-max-steps 1000 --reward-steps 1000 --report-windows 32 --report-iterations 1".split()
    rec = s.run("pretrain", "pretrain", cmd, s.left(until))
    line = next((x for x in reversed(rec["output"].splitlines()) if x.startswith("timings (s): ")), "")
    timings = json.loads(line[len("timings (s): ") :]) if line else {}
    dm_step = timings["dm_s"] / s.args.dm_steps if "dm_s" in timings else None
    s.results["pretrain"] = dict(command=rec["command"], seconds=rec["seconds"], timings_s=timings, dm_step_s=dm_step)
    return problem_of(rec, "pretrain_models.py")


def run_flags(s: Session, exp_name):
    """The short run: the paper's settings (B_r 2048, L 100, N 34, M 1, batch 256) but RUN_STEPS; tiny in the dry run."""
    flags = [*data_flags(s), "--models-dir", s.work / "models", "--runs-dir", s.work / "runs", "--exp-name", exp_name]
    flags += RUN_STEPS
    if s.args.dry_run:
        flags += (
            "--preset cpu --no-cuda --rollout-batch-size 32 --rollout-length 16 --sampler-steps 4 --eval-episodes 1 "
            "--synthetic-buffer-size 20000 --batch-size 32"
        ).split()
    return flags


def run_dir(s: Session, exp_name):
    found = sorted(glob.glob(str(s.work / "runs" / f"*__{exp_name}__*")))
    return Path(found[-1]) if found else None


def read_run(folder):
    """A run folder's figures: rollout times, the update rate between the two logged rates, evaluations."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else {}
    rollouts = {r["step"]: r["dydiff/rollout_time"] for r in rows if "dydiff/rollout_time" in r}
    sps = {r["step"]: r["charts/SPS"] for r in rows if "charts/SPS" in r}
    out = dict(
        folder=str(folder),
        rollout_time_s=rollouts,
        sps_logged=sps,
        evaluations=result.get("evaluations"),
        wall_time_s=result.get("wall_time_s"),
        total_steps=result.get("total_steps"),
    )
    times = list(rollouts.values())
    out["rollout_s_median"] = statistics.median(times[1:] if len(times) > 1 else times) if times else None
    # Steps 1000 -> 1500: the rate is logged at both (cumulative since the start); between them come 500 updates and
    # the rollout of step 1000, and no evaluation.
    if 1000 in sps and 1500 in sps and 1000 in rollouts:
        span = 1500 / sps[1500] - 1000 / sps[1000]
        out["update_s"] = (span - rollouts[1000]) / 500
    return out


def e2e_run(s: Session, until):
    shutil.rmtree(s.work / "runs", ignore_errors=True)
    if s.phases.get("pretrain", {}).get("status") != "ok":
        return "skipped: no models (pretrain did not finish)"
    cmd = [s.python, "dydiff_td3bc.py", *run_flags(s, "e2e")]
    rec = s.run("run", "td3bc", cmd, s.left(until))
    folder = run_dir(s, "e2e")
    r = dict(command=rec["command"], process_s=rec["seconds"])
    if folder and (folder / "metrics.jsonl").exists():
        r.update(read_run(folder))
        keep = s.out / "run-e2e"
        keep.mkdir(exist_ok=True)
        for f in ("args.json", "metrics.jsonl", "result.json"):
            if (folder / f).exists():
                shutil.copy(folder / f, keep / f)
    s.results["run"] = r
    return problem_of(rec, "dydiff_td3bc.py")


COMPARE_ACTORS = """
import sys, torch
a, b = (torch.load(f, map_location="cpu", weights_only=False)["actor"] for f in sys.argv[1:3])
print("identical" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "different")
"""


def resume(s: Session, until):
    if s.phases.get("pretrain", {}).get("status") != "ok":
        return "skipped: no models (pretrain did not finish)"
    cmd = [s.python, "dydiff_td3bc.py", *run_flags(s, "e2e-resume")]
    r = s.results.setdefault("resume", {})
    r["command"] = s.display(cmd)
    s.phases["resume"]["commands"].append(r["command"])
    log = s.logs / "resume-killed.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {r['command']}\n")
        f.flush()
        proc = subprocess.Popen(
            list(map(str, cmd)), cwd=ROOT, env=s.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        folder = None
        try:
            while proc.poll() is None and time.monotonic() < until - 5:
                folder = run_dir(s, "e2e-resume")
                if folder and (folder / "checkpoint.pt").exists():
                    break
                time.sleep(0.1)
        except BaseException:  # this session stopped: the run goes too
            stop(proc)
            raise
        finished = proc.poll() is not None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    r["killed_after_s"] = round(time.monotonic() - t0, 1)
    folder = run_dir(s, "e2e-resume")
    if finished:
        return f"failed: the run ended (exit {proc.returncode}) before its first checkpoint could be killed; see {log.name}"
    if folder is None or not (folder / "checkpoint.pt").exists():
        return "timed out: no checkpoint before the box ran out"
    r["killed"] = "SIGKILL after the first checkpoint appeared"
    rec = s.run("resume", "resumed", [s.python, "dydiff_td3bc.py", "--resume", folder], s.left(until))
    r["resume_command"] = rec["command"]
    r["resume_process_s"] = rec["seconds"]
    m = re.search(r"resuming .* at step ([\d,]+)", rec["output"])
    r["resumed_at_step"] = int(m.group(1).replace(",", "")) if m else None
    if problem := problem_of(rec, "the resumed run"):
        return problem
    fig = read_run(folder)
    r.update(evaluations=fig["evaluations"], total_steps=fig["total_steps"])
    whole = s.results.get("run", {})
    if whole.get("evaluations") is not None:
        r["evaluations_uninterrupted"] = whole["evaluations"]
        r["same_evaluations"] = whole["evaluations"] == fig["evaluations"]
        cmp = s.run(
            "resume",
            "compare-actors",
            [s.python, "-c", COMPARE_ACTORS, Path(whole["folder"]) / "final_policy.pt", folder / "final_policy.pt"],
            s.left(until),
        )
        r["final_actor_vs_uninterrupted"] = (
            cmp["output"].splitlines()[-1] if cmp["rc"] == 0 else f"comparison failed ({cmp['rc']})"
        )
    if r["resumed_at_step"] is None or fig["total_steps"] is None:
        return "failed: the resumed run did not say where it resumed or wrote no result.json"
    return None


# ---------------------------------------------------------------------------------------------- the report


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def demoted(markdown):
    """The benchmark's own Markdown with its headings moved down (# to ###, ### to ####), under a section of this report."""
    out = []
    for line in markdown.splitlines():
        level = len(line) - len(line.lstrip("#"))
        out.append("#" * (3 if level == 1 else min(6, level + 1)) + line[level:] if level else line)
    return "\n".join(out)


def write_report(s: Session):
    a, R, P = s.args, s.results, s.phases
    env, inst, tst = R.get("environment", {}), R.get("install", {}), R.get("tests", {})
    bench = (R.get("benchmark") or {}).get("figures") or {}
    comp = (R.get("compiled") or {}).get("figures") or {}
    pre, run, res, data = R.get("pretrain", {}), R.get("run", {}), R.get("resume", {}), R.get("dataset", {})
    md = ["# DyDiff GPU session", ""]
    md.append(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}"
        f"{', **dry run: tiny sizes on the CPU**' if a.dry_run else ''}. Command: `{shlex.join(['python', *sys.argv])}`. "
        f"Budget {a.budget:.0f} s, used {s.elapsed():.0f} s. In the commands below `python` is `{s.python}`, "
        f"`$WORK` is `{s.work}` and `$OUT` this folder."
    )
    md += ["", SECTIONS[0], "", "| phase | box s | used s | status |", "|---|---|---|---|"]
    for name, p in P.items():
        md.append(f"| {name} | {p['box_s']:.0f} | {fmt(p.get('seconds'), 1)} | {p['status']} |")
    if "dataset" in s.background and "record" in s.background["dataset"]:
        d = s.background["dataset"]["record"]
        status = "ok" if d["rc"] == 0 else ("timed out" if d["timed_out"] else f"exit {d['rc']}")
        md.append(f"| dataset (background, from the end of environment) | {DATASET_BOX_S} | {d['seconds']:.0f} | {status} |")

    md += ["", SECTIONS[1], ""]
    md.append(f"- GPU: {env.get('gpu') or 'none'}" + (f" ({env['gpu_memory_gib']} GiB)" if env.get("gpu_memory_gib") else ""))
    md.append(f"- nvidia-smi (name, driver, memory): {env.get('nvidia_smi') or 'not found'}; full output in `nvidia-smi.txt`")
    md.append(
        f"- Python {env.get('python', '—')}, torch {env.get('torch', '—')} (CUDA {env.get('cuda') or 'none'}), "
        f"{env.get('cpus', '—')} CPUs, a C compiler for torch.compile: {env.get('compiler', '—')}"
    )
    md.append(
        f"- wandb importable: {env.get('wandb', '—')} (runs without `--track` never import it); pytest-xdist: "
        f"{env.get('xdist', '—')}; `pip list` in `pip-list.txt`"
    )
    md += ["", "Commands: " + "; ".join(f"`{c}`" for c in P.get("environment", {}).get("commands", []))]

    md += ["", SECTIONS[2], ""]
    if inst.get("skipped"):
        md.append(f"Not run: {inst['skipped']}.")
    else:
        md.append(
            f"- venv `{inst.get('venv')}` with `--system-site-packages`; {inst.get('wheel_count', '—')} wheels from "
            f"`{inst.get('wheels')}` ({inst.get('wheel_folder_mib', '—')} MiB); `pip install --no-index --no-deps` took "
            f"{fmt(inst.get('pip_install_s'), 1)} s"
        )
        checks = inst.get("pip_check") or []
        md.append(
            f"- `pip check`: {'; '.join(checks) if checks else 'no problems'}"
            + (" (MuJoCo's viewer, left out on purpose)" if checks and not inst.get("pip_check_unexpected") else "")
        )
        md += ["", "Commands: " + "; ".join(f"`{c}`" for c in P.get("install", {}).get("commands", []))]

    md += ["", SECTIONS[3], ""]
    if tst:
        counts = ", ".join(f"{v} {k}" for k, v in tst.get("counts", {}).items()) or "no results"
        md.append(f"`{tst['command']}`")
        md += [
            "",
            f"- {counts} in {tst['seconds']:.0f} s ({tst.get('workers', 1)} worker(s)); pytest's summary: "
            f"{tst.get('summary') or '—'}" + (" — **cut at its time box**" if tst.get("timed_out") else ""),
        ]
        if tst.get("failed"):
            md.append(f"- failed: {', '.join(tst['failed'])} (output in `logs/tests-pytest.log`)")
        if not R.get("environment", {}).get("wandb", True):
            md.append("- wandb is not installed: the tests run without `--track` and skip what they check of W&B")
        md += ["", "| test | outcome |", "|---|---|"] + [f"| {t} | {o} |" for t, o in tst.get("outcomes", {}).items()]
    else:
        md.append("Not run.")

    md += ["", SECTIONS[4], ""]
    if R.get("benchmark"):
        md += [f"`{R['benchmark']['command']}` ({R['benchmark']['seconds']:.0f} s):", ""]
        md.append(demoted((s.out / "benchmark.md").read_text()) if (s.out / "benchmark.md").exists() else "")
    if R.get("compiled"):
        what = "the torch.compile'd bf16 denoiser" if not a.dry_run else "(dry run: without torch.compile)"
        md += ["", f"Compiled phase, {what}: `{R['compiled']['command']}` ({R['compiled']['seconds']:.0f} s):", ""]
        md.append(demoted((s.out / "benchmark-compiled.md").read_text()) if (s.out / "benchmark-compiled.md").exists() else "")
    if not R.get("benchmark") and not R.get("compiled"):
        md.append("Not run.")

    md += ["", SECTIONS[5], ""]
    md += e2e_section(s, bench, comp, data, pre, run)

    md += ["", SECTIONS[6], ""]
    if res:
        md.append(
            f"`{res.get('command')}`, killed with SIGKILL {fmt(res.get('killed_after_s'), 1)} s after its start "
            f"(once `checkpoint.pt` appeared), then `{res.get('resume_command', '—')}` "
            f"({fmt(res.get('resume_process_s'), 1)} s)."
        )
        md += [
            "",
            f"- resumed at step {fmt(res.get('resumed_at_step'))} and finished at step {fmt(res.get('total_steps'))} "
            f"on {'the CPU' if a.dry_run else 'CUDA'}",
        ]
        if "same_evaluations" in res:
            md.append(
                f"- evaluations {res['evaluations']} vs the uninterrupted run's {res['evaluations_uninterrupted']}: "
                f"{'identical' if res['same_evaluations'] else 'different'}; final actor weights: "
                f"{res.get('final_actor_vs_uninterrupted', '—')}"
            )
    else:
        md.append("Not run.")
    md.append(f"\nStatus: {P.get('resume', {}).get('status', 'not run')}.")

    md += ["", SECTIONS[7], ""]
    files = sorted(str(f.relative_to(s.out)) for f in s.out.rglob("*") if f.is_file() and f.name not in ("report.md",))
    md += [f"- `{f}`" for f in files] + ["- `report.md` (this file)"]
    (s.out / "report.md").write_text("\n".join(md) + "\n")
    payload = dict(
        meta=dict(
            command=sys.argv,
            dry_run=a.dry_run,
            budget_s=a.budget,
            used_s=round(s.elapsed(), 1),
            commit=git_commit(),
            python=s.python,
            work=str(s.work),
            dataset_steps=a.dataset_steps,
        ),
        phases=P,
        **{k: v for k, v in R.items()},
    )
    (s.out / "report.json").write_text(json.dumps(payload, indent=1, default=str))


def e2e_section(s, bench, comp, data, pre, run):
    md = []
    if not (data or pre or run):
        return ["Not run."]
    md.append(
        f"maze2d-large generated locally with {fmt(s.args.dataset_steps)} steps"
        + (
            ""
            if s.args.dataset_steps == 1_000_000
            else " (the paper's datasets have 1M; fewer keep the session in its "
            "time box, and the sizes of the networks and of the rollout do not depend on it)"
        )
        + "."
    )
    if data:
        md += [
            "",
            f"- dataset: `{data['command']}`, {fmt(data.get('seconds'), 1)} s in the background: {data.get('summary') or '—'}",
        ]
    if pre:
        md.append(f"- pretraining: `{pre['command']}`, {pre['seconds']:.0f} s; timings (s) {pre.get('timings_s') or '—'}")
    if run:
        md.append(
            f"- the run: `{run['command']}`, {run['process_s']:.0f} s in all (start-up, data and models included); "
            f"training {fmt(run.get('wall_time_s'), 1)} s by the run's own clock; rollout times (s) by step "
            f"{ {k: round(v, 3) for k, v in (run.get('rollout_time_s') or {}).items()} }; evaluations {run.get('evaluations')}"
        )
    upd = bench.get("update") or {}
    proj = bench.get("projection") or {}
    rows = [
        (
            "DM training step, batch 256 (s)",
            proj.get("dm_train_step_s"),
            pre.get("dm_step_s"),
            "benchmark: `projection`; run: pretraining's DM seconds / DM steps",
        ),
        (
            "rollout step (s)",
            (bench.get("rollout") or {}).get("whole_s"),
            run.get("rollout_s_median"),
            "run: median of the rollouts after the first (the first includes warm-up)",
        ),
        (
            "TD3+BC update with a mixed batch, eager (ms)",
            1000 / upd["eager/mixed with D_syn"] if "eager/mixed with D_syn" in upd else None,
            run["update_s"] * 1000 if run.get("update_s") is not None else None,
            "run: steps 1000-1500 from the logged rates, less the rollout at 1000",
        ),
    ]
    md += [
        "",
        "What the benchmark projects and what the run measured (the benchmark: random weights, its own sampler "
        "variant; the run: the scripts' defaults, bf16 DM on a GPU, eager update):",
        "",
        "| figure | benchmark | this run | how |",
        "|---|---|---|---|",
    ]
    md += [f"| {name} | {fmt(b, 4)} | {fmt(r, 4)} | {how} |" for name, b, r, how in rows]
    if all(x[2] is not None for x in rows) and proj:
        evals = proj["parts_s"].get("evaluation (upper bound)", 0.0)
        total = 100_000 * rows[0][2] + 2000 * rows[1][2] + 1_000_000 * rows[2][2] / 1000 + evals
        md += [
            "",
            f"A 1M-step DyDiff-TD3+BC run at these rates: 100k DM steps x {rows[0][2]:.4f} s + 2,000 rollout steps x "
            f"{rows[1][2]:.3f} s + 1M updates x {rows[2][2]:.3f} ms + evaluations {evals / 60:.1f} min (the benchmark's "
            f"upper bound) = **{total / 60:,.0f} min**; the benchmark projects "
            f"**{proj['dydiff_s'] / 60:,.0f} min** (ensemble and reward-model pretraining in neither).",
        ]
        s.results.setdefault("e2e", {})["projected_run_min"] = round(total / 60, 1)
    variant = (s.results.get("compiled") or {}).get("variant")
    sampler = (comp.get("sampler") or {}).get(variant)
    eager = ((bench.get("sampler") or {}).get("bf16 eager")) or {}
    if sampler and eager:
        md += [
            "",
            f"The {variant} sampler of the compiled phase: {sampler['seconds']:.3f} s per sample vs {eager['seconds']:.3f} s "
            f"for bf16 eager ({eager['seconds'] / sampler['seconds']:.2f}x); the projection above uses the benchmark "
            f"phase's fastest, {(bench.get('rollout') or {}).get('variant', '—')}.",
        ]
    md.append(
        f"\nStatus: pretrain {s.phases.get('pretrain', {}).get('status', 'not run')}, run "
        f"{s.phases.get('run', {}).get('status', 'not run')}."
    )
    return md


def git_commit():
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"


# The inline scripts, named in the report's commands instead of printed whole.
INLINE = {
    ENV_PROBE: "<ENV_PROBE of experiments/gpu_session.py>",
    COMPARE_ACTORS: "<COMPARE_ACTORS of experiments/gpu_session.py>",
}


def main(argv=None):
    s = Session(parse_args(argv))
    s.say(f"GPU session{' (dry run)' if s.args.dry_run else ''}: budget {s.args.budget:.0f} s, report in {s.out}")
    write_report(s)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"terminated after {s.elapsed():.0f} s"))
    try:
        run_phases(s)
    except (SystemExit, KeyboardInterrupt) as e:  # killed from outside: stop the children, keep what was measured
        running = [k for k, v in s.phases.items() if v["status"] == "not run" and "seconds" not in v]
        if running:
            s.phases[running[0]]["status"] = f"interrupted: {e or 'Ctrl-C'}"
        raise
    finally:
        if "dataset" in s.background and "record" not in s.background["dataset"]:
            wait_dataset(s, time.monotonic())
        write_report(s)
    failed = {k: v["status"] for k, v in s.phases.items() if v["status"] != "ok"}
    s.say(f"report: {s.out / 'report.md'}" + (f"; not ok: {failed}" if failed else "; every phase ok"))
    return 1 if failed else 0


def run_phases(s: Session):
    s.phase("install", lambda until: install(s, until))
    s.phase("environment", lambda until: environment(s, until))
    if s.wanted("pretrain") and s.phases["environment"]["status"] == "ok":
        start_dataset(s)
    for name, fn in (
        ("tests", tests),
        ("benchmark", benchmark),
        ("compiled", compiled),
        ("pretrain", pretrain),
        ("run", e2e_run),
        ("resume", resume),
    ):
        if s.phases.get("environment", {}).get("status") != "ok" and name in s.phases:
            s.phases[name]["status"] = "skipped: the environment is not ready"
            continue
        s.phase(name, lambda until, fn=fn: fn(s, until))


if __name__ == "__main__":
    sys.exit(main())
