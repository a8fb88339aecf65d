"""The compatibility matrix, one session per cell (docs/activation.md has the table of results).

    nox -s fresh         # the README's install, unpinned: the day's newest transformers/TRL (CI's environment)
    nox -s newest        # transformers/TRL newest verified, pinned (requirements/newest.txt)
    nox -s oldest        # torch 2.8.0 (the floor) with transformers/TRL oldest supported (.ci/oldest.sh)
    nox -s llamafactory  # LLaMA-Factory 0.9.5 with its own pins, CPU torch (.ci/llamafactory.sh)
    nox -s openrlhf      # OpenRLHF 0.11.2 imports, adapter driven on CPU (.ci/openrlhf.sh)
    nox -s axolotl       # Axolotl 0.19.0 with its own pins, CPU torch (.ci/axolotl.sh)
    nox -s swift         # ms-swift 4.6.0 with its own pins, CPU torch (.ci/swift.sh)

Every environment but the oldest keeps the CPU build of torch 2.13.0 (requirements/cpu-torch.txt as a
constraint); the oldest pins torch at pyproject.toml's floor (requirements/oldest.txt), PyPI's CUDA build.
`.ci/run` builds the fresh cell itself and runs the whole suite in it; when tests fail there,
`.ci/pinned-rerun` runs them again under requirements/newest.txt.
"""

import nox

nox.options.sessions = ["fresh"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINT = ("-c", "requirements/cpu-torch.txt")
TRANSFORMERS_TESTS = (
    "tests/test_trainer.py",
    "tests/test_adapters_contract.py",
    "tests/test_bootstrap.py",
    "tests/test_bootstrap_startup.py",
    "tests/test_cli_e2e.py",
    "tests/test_docs.py",  # every module's docstring examples, the Trainer adapter's among them
)


def _transformers_cell(session: nox.Session, requirements: str) -> None:
    session.install(*CONSTRAINT, "torch==2.13.0")
    session.install(*CONSTRAINT, "-r", requirements)
    session.install("--no-deps", "-e", ".")  # also installs the start-up hook (.pth)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", *TRANSFORMERS_TESTS, *session.posargs)


@nox.session(python="3.11")
def fresh(session: nox.Session) -> None:
    """The README's two install lines as a new user runs them: only torch pinned, everything else
    the newest of the day. `nox -s fresh` runs the Trainer and activation tests; `-- tests` all."""
    session.install(*CONSTRAINT, "torch==2.13.0")
    session.install("-e", ".[trl,deepspeed,bench,dev]")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", *(session.posargs or TRANSFORMERS_TESTS))


@nox.session(python="3.11")
def newest(session: nox.Session) -> None:
    _transformers_cell(session, "requirements/newest.txt")


@nox.session(python=False)
def oldest(session: nox.Session) -> None:
    """torch at the floor, transformers/TRL/accelerate/datasets at the lower ends of the `trl` extra, in a
    cached venv (.ci/oldest.sh): the region, exactness, sharing, FSDP2 and verify tests, and the
    Trainer and activation tests (TRANSFORMERS_TESTS)."""
    session.run("bash", ".ci/oldest.sh", *session.posargs, external=True)


@nox.session(python=False)
def llamafactory(session: nox.Session) -> None:
    session.run("bash", ".ci/llamafactory.sh", *session.posargs, external=True)


@nox.session(python=False)
def openrlhf(session: nox.Session) -> None:
    session.run("bash", ".ci/openrlhf.sh", *session.posargs, external=True)


@nox.session(python=False)
def axolotl(session: nox.Session) -> None:
    session.run("bash", ".ci/axolotl.sh", *session.posargs, external=True)


@nox.session(python=False)
def swift(session: nox.Session) -> None:
    session.run("bash", ".ci/swift.sh", *session.posargs, external=True)
