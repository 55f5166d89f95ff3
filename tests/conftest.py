"""Every test runs offline against a private, temporary Minari store.

`pytest --device cuda` runs the script-level tests on the GPU (the GPU acceptance run); the default,
`--device cpu`, is what CI runs. Tests that need CUDA run whenever a GPU is visible.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One temporary folder for the whole run, removed at its end: the Minari store, pytest's tmp_path folders, and the
# temporary files of every process the tests start (TMPDIR is inherited). Set before anything imports minari,
# which reads the store path from the environment.
TEST_ROOT = Path(tempfile.mkdtemp(prefix="dydiff-tests-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(TEST_ROOT)
os.environ["MINARI_DATASETS_PATH"] = str(TEST_ROOT / "minari")
os.environ["DYDIFF_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_sessionfinish(session, exitstatus):
    """The run leaves nothing behind; a maze XML that a PointMaze env left in the temporary folder fails it."""
    left = sorted(p.name for p in TEST_ROOT.glob("*.xml"))
    shutil.rmtree(TEST_ROOT, ignore_errors=True)
    if left:
        print(f"\nfiles left in the temporary folder by the code under test: {', '.join(left)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device of the script-level tests: cpu (default, CI) or cuda (the GPU acceptance run)",
    )


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "cuda":
        import pytest
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device here; run without --device on a CPU machine")
    # Read by tests/script_runs.py, which the test modules import after this hook.
    os.environ["DYDIFF_TEST_DEVICE"] = device


@pytest.fixture(autouse=True)
def grad_mode_stays_on():
    """A test that leaves torch's grad mode off (torch.set_grad_enabled(False) in code it calls) fails here, by name,
    instead of every later test that trains."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the code under test switched torch's grad mode off and left it off: use torch.no_grad() instead")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny pretrained models for maze2d-umaze (10k generated steps, L = 16), made once per test run."""
    import shlex

    from script_runs import PRETRAIN, run_script

    folder = tmp_path_factory.mktemp("tiny-models")
    run_script(
        "pretrain_models.py",
        "--env-id",
        "maze2d-umaze",
        "--dataset-steps",
        "10000",
        "--rollout-length",
        "16",
        "--models-dir",
        str(folder),
        *shlex.split(PRETRAIN),
    )
    return folder
